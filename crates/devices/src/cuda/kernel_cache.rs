//! Compiled kernels (PTX text or CUBIN images) kept on disk, so that a new probe worker (after a
//! fault, or at each start) loads them instead of running NVRTC again. A file is named by its
//! family, architecture and a hash of everything that went into it (source, architecture,
//! options, headroom's version); a file that cannot be read or written is no error, only a
//! compilation.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// The cache directory: `HEADROOM_KERNEL_CACHE` (empty turns the cache off), else
/// `$XDG_CACHE_HOME/headroom/kernels` (`~/.cache/headroom/kernels`).
pub fn directory() -> Option<PathBuf> {
    match std::env::var_os("HEADROOM_KERNEL_CACHE") {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => dirs::cache_dir().map(|d| d.join("headroom").join("kernels")),
    }
}

/// The file that holds `source` compiled for `arch` with `options`; `extension` is `ptx` or
/// `cubin`.
pub fn file_for(
    dir: &Path,
    name: &str,
    source: &str,
    (arch, options): (&str, &[String]),
    extension: &str,
) -> PathBuf {
    let mut hasher = DefaultHasher::new();
    (source, arch, options, env!("CARGO_PKG_VERSION")).hash(&mut hasher);
    let stem = name.trim_end_matches(".cu");
    dir.join(format!(
        "{stem}-{arch}-{:016x}.{extension}",
        hasher.finish()
    ))
}

/// The compiled kernels in `file` if it holds some (`complete` says whether bytes are a whole
/// image), else what `compile` makes, written to `file` for the next process (through a
/// temporary file, so a reader never sees half of one).
pub fn load_or_compile<E>(
    file: Option<PathBuf>,
    complete: impl Fn(&[u8]) -> bool,
    compile: impl FnOnce() -> Result<Vec<u8>, E>,
) -> Result<Vec<u8>, E> {
    let Some(file) = file else {
        return compile();
    };
    if let Ok(bytes) = std::fs::read(&file) {
        if complete(&bytes) {
            return Ok(bytes);
        }
    }
    let image = compile()?;
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            let partial = file.with_extension(format!("partial.{}", std::process::id()));
            std::fs::write(&partial, &image)?;
            std::fs::rename(&partial, &file)
        });
    if let Err(e) = written {
        eprintln!(
            "note: compiled kernels not cached in {}: {e}",
            file.display()
        );
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "extern \"C\" __global__ void k() {}";

    #[test]
    fn a_cached_kernel_is_read_back_and_a_change_is_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let options = vec!["--std=c++17".to_string()];
        let file = file_for(dir.path(), "k.cu", SOURCE, ("compute_90", &options), "ptx");
        assert_ne!(
            file,
            file_for(dir.path(), "k.cu", SOURCE, ("compute_80", &options), "ptx")
        );
        assert_ne!(
            file,
            file_for(
                dir.path(),
                "k.cu",
                "// changed",
                ("compute_90", &options),
                "ptx"
            )
        );
        let ptx = |bytes: &[u8]| String::from_utf8_lossy(bytes).contains(".entry");
        let made = || Ok::<_, ()>(b".version 8.0\n.entry k()\n{\nret;\n}\n".to_vec());
        let first = load_or_compile(Some(file.clone()), ptx, made).unwrap();
        assert!(file.exists());
        let again = load_or_compile(Some(file.clone()), ptx, || -> Result<Vec<u8>, ()> {
            panic!("compiled although the file is there")
        })
        .unwrap();
        assert_eq!(again, first);
        // A damaged file is compiled again, not loaded.
        std::fs::write(&file, "garbage").unwrap();
        let repaired = load_or_compile(Some(file.clone()), ptx, made).unwrap();
        assert_eq!(repaired, first);
    }
}
