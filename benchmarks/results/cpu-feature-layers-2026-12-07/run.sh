cd /work/ml
for arm in plain taps; do
  extra=""; [ $arm = taps ] && extra="--feature-layers auto"
  .venv/bin/python -m speculant.distill.cli --target smollm2-135m --out /tmp/ab/$arm --data /tmp/ab/corpus.safetensors \
    --init-from speculant/embedded/smollm2-135m-draft --inputs features --layers 1 --vocab 16384 \
    --steps ${STEPS:-100} --batch-size 4 --seq-len 256 --lr 3e-4 --eval-sequences 32 --engine-prompts 0 \
    --device cpu --no-progress --save-dtype float32 --checkpoint-every 10000 $extra > /tmp/ab/$arm.log 2>&1
done
