#!/bin/bash
# The run of benchmarks/README.md "Four real defect targets": from the repository root,
#   bash benchmarks/results/transfer_defects4_64px/run.sh
# Resumable: every step reuses what an earlier (interrupted) call finished. Run at nice 10 on the
# shared 2-core CPU: the zoo first (--zoo-only), then the four targets in two processes of two
# targets each (the same zoo, the same settings), then the whole command once more, which finds
# every model and fine-tuning run done, scores (from the cached features) and evaluates all four
# targets together and prints the tables.
set -euo pipefail
R=benchmarks/results/transfer_defects4_64px
D=${DEFECTS:-/work/shared/data/defects}
python benchmarks/elpv_folder.py $R/elpv
ZOO=(--image-size 64 --packaged-sources digits,textures --pretrain-steps 100 --pretrain-batch 32
     --pretrain-flip --short-models folders
     --source tiles=$D/magnetic_tile --source pcb=$D/pcb_defects --source xsdd=$D/xsdd
     --source elpv=$R/elpv)
FT=(--learning-rate 1e-3 --learning-rate 3e-4 --seeds 2 --epochs 8 --batch-size 16
    --train-per-class 8 --valid-per-class 8 --test-per-class 20)
T=(tiles=$D/magnetic_tile pcb=$D/pcb_defects xsdd=$D/xsdd elpv=$R/elpv)
run() { nice -n 10 python benchmarks/transfer_zoo.py "${ZOO[@]}" "${FT[@]}" --out $R "$@"; }
(uptime; date -u) | tee -a $R/load.log
run --zoo-only 2>>$R/zoo.log
run --target ${T[0]} --target ${T[2]} --json $R/part1.json >$R/part1.txt 2>$R/part1.log &
run --target ${T[1]} --target ${T[3]} --json $R/part2.json >$R/part2.txt 2>$R/part2.log &
wait
(uptime; date -u) | tee -a $R/load.log
run --target ${T[0]} --target ${T[1]} --target ${T[2]} --target ${T[3]} --json $R/report.json \
    >$R/stdout.txt 2>$R/stderr.txt
(uptime; date -u) | tee -a $R/load.log
