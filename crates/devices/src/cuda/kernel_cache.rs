//! Compiled kernels kept on disk, so that a new probe worker (after a fault, or at each start)
//! loads them instead of running NVRTC again. A file is named by its family, architecture and
//! a hash of everything that went into it (source, architecture, options, headroom's version);
//! a file that cannot be read or written is no error, only a compilation.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::Ptx;

/// The cache directory: `HEADROOM_KERNEL_CACHE` (empty turns the cache off), else
/// `$XDG_CACHE_HOME/headroom/kernels` (`~/.cache/headroom/kernels`).
pub fn directory() -> Option<PathBuf> {
    match std::env::var_os("HEADROOM_KERNEL_CACHE") {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => dirs::cache_dir().map(|d| d.join("headroom").join("kernels")),
    }
}

/// The file that holds the PTX of `source` compiled for `arch` with `options`.
pub fn file_for(dir: &Path, name: &str, source: &str, arch: &str, options: &[String]) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    (source, arch, options, env!("CARGO_PKG_VERSION")).hash(&mut hasher);
    let stem = name.trim_end_matches(".cu");
    dir.join(format!("{stem}-{arch}-{:016x}.ptx", hasher.finish()))
}

/// The PTX in `file` if it is there, else what `compile` makes, written to `file` for the next
/// process (through a temporary file, so a reader never sees half of one).
pub fn load_or_compile<E>(
    file: Option<PathBuf>,
    compile: impl FnOnce() -> Result<Ptx, E>,
) -> Result<Ptx, E> {
    let Some(file) = file else {
        return compile();
    };
    if let Ok(text) = std::fs::read_to_string(&file) {
        if text.contains(".entry") {
            return Ok(Ptx::from_src(text));
        }
    }
    let ptx = compile()?;
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let partial = file.with_extension(format!("ptx.{}", std::process::id()));
            std::fs::write(&partial, ptx.to_src())?;
            std::fs::rename(&partial, &file)
        });
    if let Err(e) = written {
        eprintln!(
            "note: compiled kernels not cached in {}: {e}",
            file.display()
        );
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "extern \"C\" __global__ void k() {}";

    #[test]
    fn a_cached_kernel_is_read_back_and_a_change_is_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let options = vec!["--std=c++17".to_string()];
        let file = file_for(dir.path(), "k.cu", SOURCE, "compute_90", &options);
        assert_ne!(
            file,
            file_for(dir.path(), "k.cu", SOURCE, "compute_80", &options)
        );
        assert_ne!(
            file,
            file_for(dir.path(), "k.cu", "// changed", "compute_90", &options)
        );
        let made = || Ok::<_, ()>(Ptx::from_src(".version 8.0\n.entry k()\n{\nret;\n}\n"));
        let first = load_or_compile(Some(file.clone()), made).unwrap();
        assert!(file.exists());
        let again = load_or_compile(Some(file.clone()), || -> Result<Ptx, ()> {
            panic!("compiled although the file is there")
        })
        .unwrap();
        assert_eq!(again.to_src(), first.to_src());
        // A damaged file is compiled again, not loaded.
        std::fs::write(&file, "garbage").unwrap();
        let repaired = load_or_compile(Some(file.clone()), made).unwrap();
        assert_eq!(repaired.to_src(), first.to_src());
    }
}
