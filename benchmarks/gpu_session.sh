#!/usr/bin/env bash
# One GPU session's work, sized for ~9 minutes on one H100 (see docs/benchmarks.md), most
# important first, each result archived as soon as it exists:
#   1. on CUDA, the compiled and static paths of the embedded model give the eager tokens (plain,
#      a merge before the LLM with the class-token tower, DART's cut inside it);
#   2. fastllava bench at LLaVA-1.5-7B shapes, bf16, random weights: compiled and eager side by
#      side with transformers at batch 1 (the batch-1 targets); then the server's compiled
#      step checked against eager generate (serve_check.py); compiled with DART's cut inside the
#      LLM; eager and transformers at batch 16; compiled with a merge before the LLM; compiled
#      with int8 weights; LLaVA-NeXT-7B shapes;
#   3. with time left, training of the embedded model continued on the GPU (two learning rates).
# Usage: OUT=dir bash benchmarks/gpu_session.sh   (needs torch with CUDA; transformers for --compare)
# A CPU smoke run: OUT=/tmp/gs DEVICE=cpu DTYPE=float32 PRESET=tiny NEXT_PRESET=tiny-next NEXT_KEEP=20 KEEP=576,8 DART=fastv:layer=1 bash ...
set -u
OUT=${OUT:-gpu-session}
W=$(mktemp -d)  # everything is written here; $OUT gets a few archives (the device tool returns 8 files at most)
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16}
PRESET=${PRESET:-llava-1.5-7b} NEXT_PRESET=${NEXT_PRESET:-llava-next-7b} NEXT_KEEP=${NEXT_KEEP:-2928,576}
KEEP=${KEEP:-576,64} DART=${DART:-dart:pivots=-1,merge=prop}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
left() { echo $(( DEADLINE - $(date +%s) )); }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; } > "$W/env.txt" 2>&1
cat "$W/env.txt"

DEVICE=$DEVICE timeout 120 python3 - <<'EOF2' 2>&1 | tee "$W/compiled-check.log"
import os
import fastllava
from PIL import Image
images = [Image.open(f"examples/shapes_{i}.png") for i in (1, 2, 3)] + [None]
prompts = ["What color is the circle? Answer with one word.", "How many objects are there? Answer with one word.",
           "Is there a red square? Answer with one word.", "Say hello."]
m = fastllava.load(device=os.environ["DEVICE"], dtype="float32")
ids, mask, pixels = m.encode(images, prompts)  # a left-padded batch, one row without image
for reduce in (None, "dart:keep=64,pivots=32,merge=prop", "fastervlm:keep=64,merge=prop"):
    tokens = {}
    for mode in ("eager", "compiled", "compiled", "static"):  # the second compiled run reuses the cache and graph
        m.set_decode(mode)
        tokens.setdefault(mode, []).append(m.generate_ids(ids, pixels, mask, max_new_tokens=16, eos_token_id=None,
                                                          reduce=reduce).tolist())
    same = all(t == tokens["eager"][0] for runs in tokens.values() for t in runs)
    print(f"reduce={reduce}: static and compiled decode give the eager tokens:", same, tokens["eager"][0])
EOF2
tar -C "$W" -cf "$OUT/bench.tar" .

# bench NAME TIMEOUT ARGS...: one fastllava bench run (skipped when the budget is spent), archived at once
bench() {
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt 30 ]; then echo "skipped $name: budget spent"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  timeout "$limit" python3 -m fastllava.cli bench --device $DEVICE --dtype $DTYPE --new-tokens 32 "$@" \
    --out "$W/bench-$name" 2>&1 | tee -a "$W/bench.log"
  tar -C "$W" -cf "$OUT/bench.tar" .
}
if [ -z "${SKIP_BENCH:-}" ]; then
B="--preset $PRESET --repeats 5 --warmup 2"
bench compiled 300 $B --keep $KEEP --batch-size 1 --decode compiled,eager --compare hf --profile  # compiled, eager, HF; kernels
if [ "$(left)" -gt 120 ]; then  # the server's compiled step on CUDA (free rows, spans, reductions) = eager generate
  timeout 100 python3 benchmarks/serve_check.py --device $DEVICE --decode compiled 2>&1 | grep -v -i warn | tee "$W/serve-check.log"
  tar -C "$W" -cf "$OUT/bench.tar" .
fi
bench compiled-dart 100 $B --keep ${KEEP##*,} --batch-size 1 --decode compiled --reduce $DART  # the staged compiled prefill
bench batch16 150 $B --keep $KEEP --batch-size 16 --compare hf
bench compiled-merge 90 $B --keep $KEEP --batch-size 1 --decode compiled --reduce fastervlm:merge=prop  # a float mask
bench compiled-int8 100 $B --keep ${KEEP%%,*} --batch-size 1 --decode compiled --weights int8  # half the bytes a step
bench next 60 --preset $NEXT_PRESET --repeats 3 --warmup 1 --keep $NEXT_KEEP --batch-size 1
fi

if [ "$(left)" -gt 150 ]; then
  MIN=$(python3 -c "print(($(left) - 45) / 60)")
  echo "training for $MIN minutes"
  T="--init src/fastllava/assets/default_model --vision-steps 0 --align-steps 0 --steps 100000 --batch-size 64
     --questions 8 --workers 6 --save-every 100 --minutes $MIN --device $DEVICE"
  python3 -m training.train_default_model $T --lr 0.0015 --seed 11 --out "$W/gpu-a" > "$W/train-a.log" 2>&1 &
  python3 -m training.train_default_model $T --lr 0.0008 --seed 12 --out "$W/gpu-b" > "$W/train-b.log" 2>&1 &
  wait
  tar -C "$W" -cf "$OUT/train.tar" gpu-a gpu-b train-a.log train-b.log
  tail -n 2 "$W"/train-*.log
fi
