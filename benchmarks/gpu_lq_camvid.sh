#!/usr/bin/env bash
# The issue-13 (LQ-Nets 2/32, 2/2 on Imagenette) and issue-14 (CamVid, three seeds) protocol runs on one GPU machine,
# every training its own process (OMP_NUM_THREADS=1, fp32: train.amp=false), as they were run for BENCHMARKS.md:
#   bash benchmarks/gpu_lq_camvid.sh smoke         # import check + a short LQ run on imagenette-tiny (img/s)
#   bash benchmarks/gpu_lq_camvid.sh camvid-train  # 3 seeds x (3 I-Nets + RS-Net), in the background (setsid)
#   bash benchmarks/gpu_lq_camvid.sh lq OUT        # 2 settings x (5 I-Nets + RS-Net), then every evaluation into OUT
# Data under DATA (default .data): camvid/, imagenette-224/, imagenette-tiny/. Runs under WORK (default /tmp/gpu).
set -u
DATA=${DATA:-.data}
WORK=${WORK:-/tmp/gpu}
PY=${PY:-python3}
EXTRA=${EXTRA:-}            # more config overrides for every training (a local dry run: "train.epochs=1 batch_size=8")
CAMVID_EPOCHS=${CAMVID_EPOCHS:-60}
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"

camvid_finished() {  # how many CamVid runs have trained all CAMVID_EPOCHS epochs
  grep -l "\"epoch\": $CAMVID_EPOCHS" "$WORK"/camvid/seed*/*/checkpoint.json 2>/dev/null | wc -l
}

case "${1:-}" in
smoke)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch, torchvision, flexres; print('torch', torch.__version__, 'tv', torchvision.__version__, 'cuda', torch.cuda.is_available())" || exit 1
  $PY benchmarks/lq_imagenette.py --data "$DATA/imagenette-tiny" --out "$WORK/smoke" --train-only 2/2 --only RS-Net I-112 \
      --set train.epochs=3 batch_size=50 train.amp=false 2>&1 | grep -E "epoch|Error|error" ;;
camvid-train)
  for seed in 0 1 2; do
    for label in I-192 I-144 I-96 RS-Net; do
      setsid nohup $PY benchmarks/camvid_seg.py --data "$DATA/camvid" --out "$WORK/camvid" --seed $seed --train-only --only $label \
          --set train.amp=false $EXTRA > "$WORK/logs/camvid_s${seed}_$label.log" 2>&1 < /dev/null &
    done
  done
  sleep 20; tail -n 2 "$WORK"/logs/camvid_s0_*.log ;;
lq)
  OUT=$2
  echo "train images: $(find "$DATA/imagenette-224/train" -name '*.JPEG' | wc -l), val: $(find "$DATA/imagenette-224/val" -name '*.JPEG' | wc -l)"
  pids=()
  for setting in 2/32 2/2; do
    for label in RS-Net I-112 I-96 I-80 I-64 I-48; do
      $PY benchmarks/lq_imagenette.py --data "$DATA/imagenette-224" --out "$WORK/lq" --train-only $setting --only $label \
          --set train.amp=false $EXTRA > "$WORK/logs/lq_${setting/\//-}_$label.log" 2>&1 &
      pids+=($!)
    done
  done
  (  # CamVid: evaluate each seed as soon as all its runs are trained
    while [ "$(camvid_finished)" -lt 12 ]; do sleep 5; done
    for seed in 0 1 2; do
      OMP_NUM_THREADS=2 $PY benchmarks/camvid_seg.py --data "$DATA/camvid" --out "$WORK/camvid" --seed $seed \
          --json "$OUT/camvid_seg_seed$seed.json" > "$WORK/logs/camvid_eval_s$seed.log" 2>&1 &
    done
    wait
    tar -cf - -C "$WORK/camvid/seed0" RS-Net | split -b 15m - "$OUT/camvid_rsnet_seed0.tar.part"
  ) &
  camvid_pid=$!
  while sleep "${POLL:-30}"; do
    echo "$(date +%T) lq: $(grep -h 'epoch ' "$WORK"/logs/lq_*.log 2>/dev/null | wc -l) epochs logged; camvid: $(camvid_finished)/12 done"
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    [ "$alive" -gt 0 ] || break
  done
  wait "${pids[@]}"
  pids=()
  for setting in 2/32 2/2; do
    OMP_NUM_THREADS=4 $PY benchmarks/lq_imagenette.py --data "$DATA/imagenette-224" --out "$WORK/lq" --settings $setting \
        --json "$OUT/lq_${setting/\//-}.json" > "$WORK/logs/lq_eval_${setting/\//-}.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  pack() { (cd "$WORK" && tar -czf "$OUT/logs.tar.gz" logs lq/*/seed0/*/metrics.jsonl lq/*/seed0/*/wall_seconds.json \
      camvid/seed*/*/metrics.jsonl camvid/seed*/*/wall_seconds.json 2>/dev/null); }
  pack
  wait $camvid_pid
  pack
  tail -n 30 "$WORK"/logs/lq_eval_*.log "$WORK"/logs/camvid_eval_s0.log ;;
*)
  echo "usage: $0 smoke | camvid-train | lq OUT" >&2; exit 2 ;;
esac
