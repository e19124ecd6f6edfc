#!/usr/bin/env bash
# One GPU session's work, sized for ~9 minutes on one H100 (see README, "Benchmarks"):
#   1. fastllava bench at LLaVA-1.5-7B shapes (eager with --compare hf, then compiled decode, with a
#      merge before the LLM, with DART's cut inside it, with int8 weights) and at LLaVA-NeXT-7B
#      shapes, bf16, random weights;
#   2. training of the embedded model continued on the GPU (two learning rates side by side, batch
#      generation in worker processes), while the compiled decode of the embedded model is checked
#      against the eager one on CUDA.
# Usage: OUT=dir bash benchmarks/gpu_session.sh   (needs torch with CUDA; transformers for --compare)
set -u
OUT=${OUT:-gpu-session}
W=$(mktemp -d)  # everything is written here; $OUT gets a few archives (the device tool returns 8 files at most)
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16}  # a CPU smoke run: DEVICE=cpu DTYPE=float32 PRESET=tiny ...
PRESET=${PRESET:-llava-1.5-7b} NEXT_PRESET=${NEXT_PRESET:-llava-next-7b} NEXT_KEEP=${NEXT_KEEP:-2928,576}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; } > "$W/env.txt" 2>&1
cat "$W/env.txt"

if [ -z "${SKIP_BENCH:-}" ]; then
B="--preset $PRESET --device $DEVICE --dtype $DTYPE --new-tokens 32 --repeats 5 --warmup 2"
timeout 150 python3 -m fastllava.cli bench $B --keep 576,64 --batch-size 1,16 --compare hf --out "$W/bench-eager" 2>&1 | tee "$W/bench.log"
tar -C "$W" -cf "$OUT/bench.tar" .
timeout 240 python3 -m fastllava.cli bench $B --keep 576,64 --batch-size 1 --decode compiled --out "$W/bench-compiled" 2>&1 | tee -a "$W/bench.log"
tar -C "$W" -cf "$OUT/bench.tar" .
timeout 90 python3 -m fastllava.cli bench $B --keep 576,64 --batch-size 1 --decode compiled --reduce fastervlm:merge=prop \
  --out "$W/bench-compiled-merge" 2>&1 | tee -a "$W/bench.log"  # the cost of proportional attention's float mask
tar -C "$W" -cf "$OUT/bench.tar" .
timeout 100 python3 -m fastllava.cli bench $B --keep 64 --batch-size 1 --decode compiled --reduce dart:pivots=-1,merge=prop \
  --out "$W/bench-compiled-dart" 2>&1 | tee -a "$W/bench.log"  # a cut inside the LLM: the staged compiled prefill
tar -C "$W" -cf "$OUT/bench.tar" .
timeout 60 python3 -m fastllava.cli bench --preset $NEXT_PRESET --device $DEVICE --dtype $DTYPE --new-tokens 32 --repeats 3 \
  --warmup 1 --keep $NEXT_KEEP --batch-size 1 --out "$W/bench-next" 2>&1 | tee -a "$W/bench.log"
tar -C "$W" -cf "$OUT/bench.tar" .
timeout 100 python3 -m fastllava.cli bench $B --keep 576 --batch-size 1 --decode compiled --weights int8 \
  --out "$W/bench-compiled-int8" 2>&1 | tee -a "$W/bench.log"  # weight-only int8: half the bytes per decode step
tar -C "$W" -cf "$OUT/bench.tar" .
fi

MIN=$(python3 -c "print(max(1.0, ($(left) - 45) / 60))")
echo "training for $MIN minutes"
T="--init src/fastllava/assets/default_model --vision-steps 0 --align-steps 0 --steps 100000 --batch-size 64 --questions 8
   --workers 6 --save-every 100 --minutes $MIN --device $DEVICE"
python3 scripts/train_default_model.py $T --lr 0.0015 --seed 11 --out "$W/gpu-a" > "$W/train-a.log" 2>&1 &
python3 scripts/train_default_model.py $T --lr 0.0008 --seed 12 --out "$W/gpu-b" > "$W/train-b.log" 2>&1 &
DEVICE=$DEVICE python3 - <<'EOF2' 2>&1 | tee "$W/compiled-check.log"
import os
import fastllava
from PIL import Image
images = [Image.open(f"examples/shapes_{i}.png") for i in (1, 2, 3)] + [None]
prompts = ["What color is the circle? Answer with one word.", "How many objects are there? Answer with one word.",
           "Is there a red square? Answer with one word.", "Say hello."]
m = fastllava.load(device=os.environ["DEVICE"], dtype="float32")
ids, mask, pixels = m.encode(images, prompts)  # a left-padded batch, one row without image
for reduce in (None, "dart:keep=64,pivots=32,merge=prop", "fastv:keep=64", "fastervlm:keep=64,merge=prop"):
    tokens = {}
    for mode in ("eager", "compiled", "compiled", "static"):  # the second compiled run reuses the cache and graph
        m.model.decode_mode = mode
        tokens.setdefault(mode, []).append(m.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None,
                                                          reduce=reduce).tolist())
    same = all(t == tokens["eager"][0] for runs in tokens.values() for t in runs)
    print(f"reduce={reduce}: static and compiled decode give the eager tokens:", same, tokens["eager"][0][0])
EOF2
wait
tar -C "$W" -cf "$OUT/train.tar" gpu-a gpu-b train-a.log train-b.log compiled-check.log
tail -n 2 "$W"/train-*.log
