//! With the `cuda` feature, compile `kernels/qlorad.cu` (which includes one file per op) to PTX
//! with nvcc (found on PATH or under CUDA_HOME); the driver turns it into machine code when the
//! module first loads. With `cudnn`, also compile `kernels/cudnn_attention.cpp` against cuDNN's
//! and cudnn-frontend's headers (`scripts/fetch_cudnn.sh` puts them under /opt/cudnn-pip).

use std::path::PathBuf;

fn main() {
    // A directory: any file under it.
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("qlorad.ptx");
    let cuda_home = std::env::var("CUDA_HOME").ok().map(PathBuf::from);
    let nvcc = cuda_home
        .as_ref()
        .map(|h| h.join("bin/nvcc"))
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
    #[cfg(feature = "cudnn")]
    cudnn(cuda_home.as_deref());
}

/// cuDNN's attention through cudnn-frontend, which opens libcudnn at run time: nothing of
/// cuDNN is linked.
#[cfg(feature = "cudnn")]
fn cudnn(cuda_home: Option<&std::path::Path>) {
    for var in ["QLORAD_CUDNN_INCLUDE", "QLORAD_CUDNN_FRONTEND_INCLUDE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let dir = |var: &str, default: &str, header: &str| {
        let d = std::env::var(var)
            .map(PathBuf::from)
            .unwrap_or_else(|_| default.into());
        assert!(
            d.join(header).exists(),
            "the cudnn feature needs {header} in {} (set {var}, or run scripts/fetch_cudnn.sh)",
            d.display()
        );
        d
    };
    let cudnn = dir(
        "QLORAD_CUDNN_INCLUDE",
        "/opt/cudnn-pip/cudnn/include",
        "cudnn.h",
    );
    let frontend = dir(
        "QLORAD_CUDNN_FRONTEND_INCLUDE",
        "/opt/cudnn-pip/frontend/include",
        "cudnn_frontend.h",
    );
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .include(frontend)
        .include(cudnn);
    if let Some(home) = cuda_home {
        build.include(home.join("include"));
    }
    build
        .file("kernels/cudnn_attention.cpp")
        .compile("qlorad_cudnn");
    println!("cargo:rustc-link-lib=dylib=dl");
}
