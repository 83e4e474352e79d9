// qlorad's CUDA kernels, one PTX module: 4-bit (NF4/FP4) quantize and dequantize bit for bit as
// bitsandbytes, the fused training ops (hash dropout, masked attention softmax, cross-entropy,
// RMSNorm, rotary embedding, SwiGLU) with their backward passes, and AdamW. One file per op,
// named as the Rust file that launches it: `src/ops/<op>.rs`, `src/quant/tensor.rs` for the
// 4-bit kernels, `src/ops/cuda.rs` for AdamW.
//
// Every kernel has a CPU twin in Rust computing the same thing in the same order; the
// `qlorad bench kernels` command checks them against each other on a GPU.

#include "quant_4bit.cu"
#include "dropout.cu"
#include "attn_softmax.cu"
#include "cross_entropy.cu"
#include "adamw.cu"
#include "rms_norm.cu"
#include "rope.cu"
#include "swiglu.cu"
