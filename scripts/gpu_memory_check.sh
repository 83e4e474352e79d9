#!/bin/bash
# Memory model check on the GPU: estimated vs measured peaks, and 8-bit AdamW. Part 1 or 2.
CD=$(python3 -c "import nvidia.cudnn as m;print(list(m.__path__)[0])")/lib
export LD_LIBRARY_PATH=$CD:$LD_LIBRARY_PATH QLORAD_CUDNN_LIB=$CD/libcudnn.so.9
cd "$(dirname "$0")/.."  # the checkout: the side-by-side harness in gpu/peers, the CUDA binary at gpu/qlorad.xz
if [ "$1" = 1 ]; then
QLORAD=gpu/qlorad.xz SHAPES="llama-3.2-1b llama-3-8b" SEQS="2048 8192" PEERS="qlorad" QCKPT=true STEPS=4 RESULTS=${OUT:-./memory-check}/ckpt bash gpu/peers/side_by_side.sh
else
QLORAD=gpu/qlorad.xz SHAPES="llama-3.2-1b" SEQS="2048 4096" PEERS="qlorad" QCKPT=false STEPS=4 RESULTS=${OUT:-./memory-check}/nockpt bash gpu/peers/side_by_side.sh
QLORAD=gpu/qlorad.xz SHAPES="llama-3-8b" SEQS="2048" PEERS="qlorad" QCKPT=true STEPS=4 QSPEC='{"lora": {"r": 64}}' RESULTS=${OUT:-./memory-check}/r64 bash gpu/peers/side_by_side.sh
QLORAD=gpu/qlorad.xz SHAPES="llama-3-8b" SEQS="2048" PEERS="qlorad" QCKPT=true STEPS=4 QSPEC='{"lora": {"r": 64}, "hyperparameters": {"optimizer": "adamw_bnb_8bit"}}' RESULTS=${OUT:-./memory-check}/r64-8bit bash gpu/peers/side_by_side.sh
fi
