#!/bin/bash
# The cluttered-digits study: three teachers, one store, a grid of student variants x seeds,
# then `pipeline report` (test split read once per run). About 45 minutes on 2 CPU cores.
#
#   bash benchmarks/cluttered_digits.sh [OUT]      (OUT defaults to data_cache/cluttered)
#
# Variants are chosen on validation top-1 (printed by every run); the report's test numbers
# are read once per run at the end. Students run single-threaded, two at a time.
set -euo pipefail
OUT=${1:-data_cache/cluttered}
DATA=(--dataset cluttered-digits)
mkdir -p "$OUT/logs"

python -m pipeline train-teachers "${DATA[@]}" --teachers resnet20,wrn16_2,vgg8_bn --epochs 30 --shift 4 \
    --out-dir "$OUT/teachers"
python -m pipeline extract-teachers "${DATA[@]}" --store "$OUT/store.zarr" \
    --teachers "$OUT/teachers/resnet20.pt,$OUT/teachers/wrn16_2.pt,$OUT/teachers/vgg8_bn.pt"

MAIN="ce|--method ce
kd|--method kd
kd-avg|--method kd-avg
at-b1|--method at --beta 1
ekd-b10|--method explain-kd --beta 10
ekd-b0|--method explain-kd --beta 0
ekd-att-b0.5|--method explain-kd --student-map attention --beta 0.5
ekd-att-b1|--method explain-kd --student-map attention --beta 1
ekd-att-best-b0.5|--method explain-kd --student-map attention --kd-source best --beta 0.5"
THREE_SEEDS="ekd-b1|--method explain-kd --beta 1
ekd-att-best-b1|--method explain-kd --student-map attention --kd-source best --beta 1
kd-shift4|--method kd --shift 4
ekd-att-b0.5-shift4|--method explain-kd --student-map attention --beta 0.5 --shift 4
ekd-att-b0.5-shift4-fixed|--method explain-kd --student-map attention --beta 0.5 --shift 4 --no-map-follows"
ONE_SEED="at-b10|--method at --beta 10
at-b3|--method at --beta 3
ekd-b0.1|--method explain-kd --beta 0.1
ekd-b1-warm5|--method explain-kd --beta 1 --beta-warmup 5
ekd-global-b10|--method explain-kd --policy global --beta 10
ekd-weighted-b10|--method explain-kd --policy weighted --beta 10
ekd-correct-b10|--method explain-kd --policy correct --beta 10
ekd-detach-b10|--method explain-kd --detach-head --beta 10
ekd-detach-b100|--method explain-kd --detach-head --beta 100
ekd-best-b0.1|--method explain-kd --kd-source best --beta 0.1
ekd-att-best-b10|--method explain-kd --student-map attention --kd-source best --beta 10
ekd-b0.1-shift4|--method explain-kd --beta 0.1 --shift 4"

grid() {  # grid "VARIANTS" "SEEDS": every variant x seed, two runs at a time
    for seed in $2; do echo "$1" | while IFS='|' read -r name args; do echo "$name $seed $args"; done; done |
        OUT=$OUT xargs -P 2 -L 1 bash -c 'name=$0 seed=$1; shift;
            OMP_NUM_THREADS=1 python -m pipeline train-student --dataset cluttered-digits --store "$OUT/store.zarr" \
                --out-dir "$OUT/students" --run-name "$name-s$seed" --seed "$seed" --epochs 10 "$@" \
                > "$OUT/logs/$name-s$seed.log" 2>&1 || { echo "$name-s$seed FAILED, see $OUT/logs"; exit 255; }
            echo "$name-s$seed: $(grep "validation top-1" "$OUT/logs/$name-s$seed.log")"'
}
grid "$MAIN" "0 1 2 3 4"
grid "$THREE_SEEDS" "0 1 2"
grid "$ONE_SEED" "0"
python -m pipeline report "${DATA[@]}" --students-dir "$OUT/students" --out-dir reports/cluttered-digits \
    --store "$OUT/store.zarr"
