#!/usr/bin/env bash
# The one prepared GPU check of a session lent a device (docs/benchmarks.md, "GPU"): the ZeRO-stage
# configs with bf16 and fp16 on CUDA/NCCL (one process, one GPU), then the benchmarks with
# --device cuda. Needs the project's pure-Python dependencies as wheels in .whl/ (the device has
# torch but no package index):
#   pip download --no-deps -d .whl open_clip_torch==3.3.0 omegaconf==2.3.0 webdataset==0.2.86 ...
#   DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.7 antlr4-python3-runtime==4.9.3
# Results go to $OUT (zero_stages.txt, mfu.json, stored.json and the logs).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v -i warning | tail -3
python3 -c "import torch, deepspeed, open_clip; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'deepspeed', deepspeed.__version__, 'open_clip', open_clip.__version__)"
python3 -m data_tools synthetic /tmp/syn --train 2048 --val 128 --zeroshot 0 --samples-per-shard 256 --no-progress > "$OUT/data.log" 2>&1
for stage in 0 1 2 3; do
  for precision in bf16 fp16; do
    log="$OUT/zero$stage-$precision.log"
    timeout 150 python3 -m training --config configs/tiny-distill.yaml run_dir="/tmp/run-$stage-$precision" \
      data.train=/tmp/syn/train data.batch_size=64 data.workers=2 model.teacher_pretrained=null \
      optim.total_steps=30 log.every_steps=10 log.tensorboard=false checkpoint.resume=null \
      deepspeed.zero_stage=$stage deepspeed.precision=$precision model.teacher_dtype=$precision > "$log" 2>&1
    echo "ZeRO-$stage $precision: exit $? | $(grep -o 'step 30/30 | loss [0-9.]*' "$log" | tail -1) | $(grep -o '[0-9.]* samples/s' "$log" | tail -1)"
  done
done | tee "$OUT/zero_stages.txt"
timeout 180 python3 benchmarks/mfu.py --device cuda --precision bf16 --iters 10 --warmup 3 --json "$OUT/mfu.json" 2>&1 | tail -12
timeout 240 python3 benchmarks/stored_embeddings.py --device cuda --steps 40 --warmup 10 --repeats 1 --json "$OUT/stored.json" 2>&1 | tail -15
