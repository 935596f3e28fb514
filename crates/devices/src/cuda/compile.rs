//! The kernel families' compilation to PTX by NVRTC.
//!
//! Sources are embedded in the binary ([`Family::source`]); NVRTC compiles them at run time for
//! the device's compute capability. NVRTC needs no GPU, so the same path is tested on machines
//! without one.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::kernel::Family;

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

/// Compiles one kernel family for `arch`, or loads it from the kernel cache
/// ([`super::kernel_cache`]) when an earlier process compiled the same.
pub fn compile(family: Family, arch: &str) -> Result<Ptx, CompileError> {
    let cached = super::kernel_cache::directory().map(|dir| {
        let options = options(arch);
        super::kernel_cache::file_for(&dir, family.file(), family.source(), arch, &options)
    });
    super::kernel_cache::load_or_compile(cached, || {
        compile_source(family.file(), family.source(), arch)
    })
}

/// NVRTC's options for `arch`.
fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

fn compile_source(file: &'static str, source: &str, arch: &str) -> Result<Ptx, CompileError> {
    if !nvrtc_available() {
        return Err(CompileError::NvrtcMissing);
    }
    let options = CompileOptions {
        options: options(arch),
        name: Some(file.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(source, options).map_err(|err| CompileError::Rejected {
        file,
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
            for family in Family::ALL {
                let ptx = compile(family, arch).unwrap_or_else(|e| panic!("{e}"));
                let text = ptx.to_src();
                let entries = text.matches(".entry ").count();
                assert_eq!(entries, family.kernels().count(), "{}", family.file());
                for kernel in family.kernels() {
                    assert!(
                        text.contains(&format!(".entry {}(", kernel.name())),
                        "{} for {arch} lacks kernel {kernel:?}",
                        family.file()
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
        for family in Family::ALL {
            let path = dir.join(format!("{}.ptx", family.file()));
            std::fs::write(&path, compile(family, "compute_90").unwrap().to_src()).unwrap();
            let output = std::process::Command::new(&ptxas)
                .args(["-arch=sm_90", "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .expect("ptxas runs");
            let report = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{report}");
            let entries = report.matches("Compiling entry function").count();
            assert_eq!(entries, family.kernels().count(), "{report}");
            assert_eq!(
                report
                    .matches("0 bytes spill stores, 0 bytes spill loads")
                    .count(),
                entries,
                "{} spills:\n{report}",
                family.file()
            );
        }
    }

    #[test]
    fn a_broken_kernel_is_reported_with_its_file() {
        if !nvrtc_available() {
            return;
        }
        let source = "extern \"C\" __global__ void k() { undefined_thing(); }";
        let err = compile_source("broken.cu", source, "compute_90").unwrap_err();
        assert!(err.to_string().contains("broken.cu"), "{err}");
    }
}
