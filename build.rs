//! With the `cuda` feature, compile `kernels/qlorad.cu` (which includes one file per op) to PTX
//! with nvcc (found on PATH or under CUDA_HOME); the driver turns it into machine code when the
//! module first loads.

fn main() {
    // A directory: any file under it.
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("qlorad.ptx");
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| std::path::Path::new(&h).join("bin/nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // No FMA contraction: the 4-bit kernels must round exactly as the CPU path and bitsandbytes.
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--fmad=false", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("kernels/qlorad.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on kernels/qlorad.cu");
}
