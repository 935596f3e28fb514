//! The kernel sources and their compilation to PTX by NVRTC.
//!
//! Sources are embedded in the binary; NVRTC compiles them at run time for the device's compute
//! capability. NVRTC needs no GPU, so the same path is tested on machines without one.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// One kernel family: its source file and the entry points it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// The CUDA C++ source.
    pub source: &'static str,
    /// `extern "C"` kernels the file defines.
    pub kernels: &'static [&'static str],
}

/// Every kernel family headroom launches.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "gemm.cu",
        source: include_str!("../../../kernels/gemm.cu"),
        kernels: &["gemm_nt", "gemm_tn", "gemm_nn"],
    },
    KernelSource {
        file: "elementwise.cu",
        source: include_str!("../../../kernels/elementwise.cu"),
        kernels: &["bias_add", "bias_activation", "activation_backward"],
    },
    KernelSource {
        file: "reduce.cu",
        source: include_str!("../../../kernels/reduce.cu"),
        kernels: &["column_sum", "mean"],
    },
    KernelSource {
        file: "loss.cu",
        source: include_str!("../../../kernels/loss.cu"),
        kernels: &["softmax_cross_entropy"],
    },
    KernelSource {
        file: "optimizer.cu",
        source: include_str!("../../../kernels/optimizer.cu"),
        kernels: &["sgd", "sgd_momentum", "adam"],
    },
    KernelSource {
        file: "fill.cu",
        source: include_str!("../../../kernels/fill.cu"),
        kernels: &["fill_uniform", "fill_labels"],
    },
];

/// Why the kernels could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// `libnvrtc` is not on the loader path.
    #[error(
        "NVRTC (libnvrtc.so) was not found; install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` \
         and add its lib folder to LD_LIBRARY_PATH"
    )]
    NvrtcMissing,
    /// NVRTC rejected a source file.
    #[error("NVRTC could not compile kernels/{file} for {arch}: {log}")]
    Rejected {
        /// The source file.
        file: &'static str,
        /// The virtual architecture, e.g. `compute_90`.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
}

/// Whether `libnvrtc` can be loaded (cudarc panics on use when it cannot).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library; nothing is called through it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC virtual architecture for a compute capability, e.g. `compute_90` for (9, 0).
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// Compiles one kernel family for `arch`.
pub fn compile(source: &KernelSource, arch: &str) -> Result<Ptx, CompileError> {
    if !nvrtc_available() {
        return Err(CompileError::NvrtcMissing);
    }
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(source.file.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(source.source, options).map_err(|err| CompileError::Rejected {
        file: source.file,
        arch: arch.to_string(),
        log: match err {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC runs without a GPU. CI sets HEADROOM_REQUIRE_NVRTC=1, where a missing NVRTC fails.
    #[test]
    fn every_kernel_compiles_for_ampere_and_hopper() {
        if !nvrtc_available() {
            assert!(
                std::env::var("HEADROOM_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "HEADROOM_REQUIRE_NVRTC=1 but libnvrtc could not be loaded"
            );
            eprintln!(
                "skipped: NVRTC not found (set HEADROOM_REQUIRE_NVRTC=1 to make this a failure)"
            );
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            for source in SOURCES {
                let ptx = compile(source, arch).unwrap_or_else(|e| panic!("{e}"));
                let text = ptx.to_src();
                for kernel in source.kernels {
                    assert!(
                        text.contains(&format!(".entry {kernel}(")),
                        "{} for {arch} lacks kernel {kernel}",
                        source.file
                    );
                }
            }
        }
    }

    /// With `HEADROOM_PTXAS` pointing at `ptxas` (CI installs it from the `nvidia-cuda-nvcc`
    /// wheel), every kernel is assembled for sm_90 and must not spill registers.
    #[test]
    fn no_kernel_spills_registers_on_hopper() {
        let Ok(ptxas) = std::env::var("HEADROOM_PTXAS") else {
            eprintln!("skipped: set HEADROOM_PTXAS to a ptxas binary to check register spills");
            return;
        };
        let dir = std::env::temp_dir().join(format!("headroom-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for source in SOURCES {
            let path = dir.join(format!("{}.ptx", source.file));
            std::fs::write(&path, compile(source, "compute_90").unwrap().to_src()).unwrap();
            let output = std::process::Command::new(&ptxas)
                .args(["-arch=sm_90", "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .expect("ptxas runs");
            let report = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{report}");
            let entries = report.matches("Compiling entry function").count();
            assert_eq!(entries, source.kernels.len(), "{report}");
            assert_eq!(
                report
                    .matches("0 bytes spill stores, 0 bytes spill loads")
                    .count(),
                entries,
                "{} spills:\n{report}",
                source.file
            );
        }
    }

    #[test]
    fn a_broken_kernel_is_reported_with_its_file() {
        if !nvrtc_available() {
            return;
        }
        let broken = KernelSource {
            file: "broken.cu",
            source: "extern \"C\" __global__ void k() { undefined_thing(); }",
            kernels: &[],
        };
        let err = compile(&broken, "compute_90").unwrap_err();
        assert!(err.to_string().contains("broken.cu"), "{err}");
    }
}
