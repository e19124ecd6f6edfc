"""Training of the embedded models (fastllava's default and default-next checkpoints).

Not part of the installed fastllava package: run it from the repository root, e.g.
`python -m training.train_default_model --help`.

    trainer              data stream, losses and the training loop (TrainSpec, train, heads_path)
    guidance             dense auxiliary targets and attention guidance (training-only heads)
    train_default_model  command line over trainer.train
    heads/               the embedded models' training-only heads (see trainer.heads_path)
"""
