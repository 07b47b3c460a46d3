#!/bin/bash
# Nsight Compute of the two tier launches of one in-situ ZipCache decode step
NCU=/usr/local/cuda/bin/ncu
$NCU -k regex:zipkv_mma --launch-skip 6 -c 2 --set full --import-source no -o $OUT/prof python -m benchmarks.profile_in_situ --static --plain > $OUT/ncu_run.log 2>&1
tail -3 $OUT/ncu_run.log
$NCU -i $OUT/prof.ncu-rep --page details > $OUT/details.txt 2>&1
$NCU -i $OUT/prof.ncu-rep --page source --print-source sass --csv > $OUT/source.csv 2>&1
ls -la $OUT; grep -E "Duration|Issued Ipc|Warp Cycles Per Issued|bank" $OUT/details.txt | head
