#!/usr/bin/env bash
# H200: the 1500-step W4A4KV4 student and the teacher, each evaluated in float32 and in bfloat16 (500 problems).
set -u
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p art/a art/s
tar xzf .gpu/teacher.tgz -C art/a demo-gpu/teacher
tar xzf .gpu/long_model.tgz -C art/s
R=recipes/demo-gpu-w4a4kv4.yaml
ev() { timeout 150 python -m pipeline.cli eval "$1" --recipe $R --limit 500 --batch-size 500 --max-new-tokens 768 --dtype $2 --out $OUT/$3.jsonl > $OUT/$3.log 2>&1; }
ev art/s/kd_qat_quarot_long bfloat16 student-bf16 &
ev art/s/kd_qat_quarot_long float32 student-fp32 &
ev art/a/demo-gpu/teacher float32 teacher-fp32 &
wait
for f in $OUT/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "accuracy|tokens/s" ; done
