//! The kernel families' compilation by NVRTC: to a CUBIN for the device's own architecture
//! (`sm_90`), which any driver that supports the GPU loads, or to PTX for its virtual
//! architecture (`compute_90`), which a driver older than NVRTC refuses
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`) and which is kept as the fallback.
//!
//! Sources are embedded in the binary ([`Family::source`]); NVRTC compiles them at run time.
//! NVRTC needs no GPU, so the same path is tested on machines without one.

use std::ffi::{c_char, c_int, CString};

use cudarc::nvrtc::{
    compile_ptx_with_opts, result as nvrtc, sys as nvrtc_sys, CompileOptions, Ptx,
};

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

/// The form kernels were loaded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelForm {
    /// Machine code for the device's architecture, compiled by NVRTC.
    Cubin,
    /// PTX, compiled to machine code by the driver at load.
    Ptx,
}

impl std::fmt::Display for KernelForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelForm::Cubin => "CUBIN",
            KernelForm::Ptx => "PTX",
        })
    }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_available() {
        return None;
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: writes two ints.
    let read = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    (read == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Compiles one kernel family to PTX for the virtual architecture `arch` (`compute_90`), or
/// loads it from the kernel cache ([`super::kernel_cache`]) when an earlier process compiled
/// the same.
pub fn compile(family: Family, arch: &str) -> Result<Ptx, CompileError> {
    let options = options(arch);
    let cached = super::kernel_cache::directory().map(|dir| {
        let config = (arch, options.as_slice());
        super::kernel_cache::file_for(&dir, family.file(), family.source(), config, "ptx")
    });
    let is_ptx = |bytes: &[u8]| String::from_utf8_lossy(bytes).contains(".entry");
    let text = super::kernel_cache::load_or_compile(cached, is_ptx, || {
        compile_source(family.file(), family.source(), arch).map(|ptx| ptx.to_src().into_bytes())
    })?;
    Ok(Ptx::from_src(String::from_utf8_lossy(&text).into_owned()))
}

/// Compiles one kernel family to a CUBIN for the real architecture `sm` (`sm_90`), or loads it
/// from the kernel cache.
pub fn compile_cubin(family: Family, sm: &str) -> Result<Vec<u8>, CompileError> {
    let options = options(sm);
    let cached = super::kernel_cache::directory().map(|dir| {
        let config = (sm, options.as_slice());
        super::kernel_cache::file_for(&dir, family.file(), family.source(), config, "cubin")
    });
    let is_elf = |bytes: &[u8]| bytes.starts_with(b"\x7fELF");
    super::kernel_cache::load_or_compile(cached, is_elf, || {
        cubin_source(family.file(), family.source(), sm)
    })
}

/// NVRTC's CUBIN of `source` for `sm`.
fn cubin_source(file: &'static str, source: &str, sm: &str) -> Result<Vec<u8>, CompileError> {
    if !nvrtc_available() {
        return Err(CompileError::NvrtcMissing);
    }
    let rejected = |log: String| CompileError::Rejected {
        file,
        arch: sm.to_string(),
        log,
    };
    let source = CString::new(source).map_err(|e| rejected(e.to_string()))?;
    let name = CString::new(file).expect("file names have no NUL");
    let program =
        nvrtc::create_program(&source, Some(&name)).map_err(|e| rejected(format!("{e:?}")))?;
    // SAFETY: `program` was created above and is destroyed once, at the end.
    let cubin = unsafe {
        let compiled = nvrtc::compile_program(program, &options(sm));
        let image = match compiled {
            Ok(()) => {
                let mut size = 0usize;
                let sized = nvrtc_sys::nvrtcGetCUBINSize(program, &mut size);
                let mut image = vec![0u8; size];
                let got = nvrtc_sys::nvrtcGetCUBIN(program, image.as_mut_ptr() as *mut c_char);
                if sized == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
                    && got == nvrtc_sys::nvrtcResult::NVRTC_SUCCESS
                    && size > 0
                {
                    Ok(image)
                } else {
                    Err(rejected(format!(
                        "NVRTC gave no CUBIN ({sized:?}, {got:?}, {size} bytes)"
                    )))
                }
            }
            Err(e) => {
                let log = nvrtc::get_program_log(program)
                    .map(|log| {
                        let bytes: Vec<u8> = log.iter().map(|&c| c as u8).collect();
                        String::from_utf8_lossy(&bytes)
                            .trim_end_matches('\0')
                            .to_string()
                    })
                    .unwrap_or_else(|_| format!("{e:?}"));
                Err(rejected(log))
            }
        };
        let _ = nvrtc::destroy_program(program);
        image
    };
    cubin
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

    /// Whether NVRTC is here; says "skipped" when not, which `HEADROOM_REQUIRE_NVRTC=1` (CI)
    /// makes a failure.
    fn nvrtc_or_skip() -> bool {
        if nvrtc_available() {
            return true;
        }
        assert!(
            std::env::var("HEADROOM_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "HEADROOM_REQUIRE_NVRTC=1 but libnvrtc could not be loaded"
        );
        eprintln!("skipped: NVRTC not found (set HEADROOM_REQUIRE_NVRTC=1 to make this a failure)");
        false
    }

    /// NVRTC runs without a GPU. CI sets HEADROOM_REQUIRE_NVRTC=1, where a missing NVRTC fails.
    #[test]
    fn every_kernel_compiles_for_ampere_and_hopper() {
        if !nvrtc_or_skip() {
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

    /// NVRTC also makes machine code for the real architectures, with every kernel in it.
    #[test]
    fn every_kernel_compiles_to_a_cubin_for_ampere_and_hopper() {
        if !nvrtc_or_skip() {
            return;
        }
        assert!(nvrtc_version().is_some_and(|(major, _)| major >= 12));
        for sm in ["sm_80", "sm_90"] {
            for family in Family::ALL {
                let cubin = cubin_source(family.file(), family.source(), sm)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert!(cubin.starts_with(b"\x7fELF"), "{} for {sm}", family.file());
                for kernel in family.kernels() {
                    let name = kernel.name().as_bytes();
                    assert!(
                        cubin.windows(name.len()).any(|w| w == name),
                        "{} for {sm} lacks kernel {kernel:?}",
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
