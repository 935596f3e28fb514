//! Request bodies parsed before. A scheduler that asks again for the same job sends the same
//! bytes: those skip JSON parsing, validation, the model's plan and the serialisation of the
//! cache key, and go straight to the cache. Only valid bodies of at most [`MAX_KEPT_BODY`]
//! bytes are kept, [`CAPACITY`] of them at most, the least used leaving first.

use std::sync::Arc;

use axum::body::Bytes;
use moka::sync::Cache;

/// The largest body kept (a job is a few hundred bytes; larger ones are parsed each time).
pub const MAX_KEPT_BODY: usize = 16 * 1024;
/// The most bodies kept.
pub const CAPACITY: u64 = 1024;

/// What each body parsed into, by its bytes.
pub struct ParsedBodies<T> {
    kept: Cache<Bytes, Arc<T>>,
}

impl<T: Send + Sync + 'static> Default for ParsedBodies<T> {
    fn default() -> Self {
        ParsedBodies {
            kept: Cache::new(CAPACITY),
        }
    }
}

impl<T: Send + Sync + 'static> ParsedBodies<T> {
    /// What `body` parsed into before, or `parse`'s answer, kept when it is a success.
    pub fn get_or_parse<E>(
        &self,
        body: &Bytes,
        parse: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        if body.len() > MAX_KEPT_BODY {
            return parse().map(Arc::new);
        }
        if let Some(parsed) = self.kept.get(body) {
            return Ok(parsed);
        }
        let parsed = Arc::new(parse()?);
        self.kept.insert(body.clone(), Arc::clone(&parsed));
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_body_is_parsed_once_errors_and_large_bodies_every_time() {
        let bodies = ParsedBodies::<usize>::default();
        let parses = Cell::new(0);
        let parse = |body: &Bytes| {
            parses.set(parses.get() + 1);
            if body.starts_with(b"{") {
                Ok(body.len())
            } else {
                Err("not JSON")
            }
        };
        let job = Bytes::from_static(b"{\"model\": 1}");
        for _ in 0..3 {
            assert_eq!(*bodies.get_or_parse(&job, || parse(&job)).unwrap(), 12);
        }
        assert_eq!(parses.get(), 1);
        let bad = Bytes::from_static(b"nope");
        for _ in 0..2 {
            assert!(bodies.get_or_parse(&bad, || parse(&bad)).is_err());
        }
        assert_eq!(parses.get(), 3);
        let large = Bytes::from(format!("{{{}}}", " ".repeat(MAX_KEPT_BODY)));
        for _ in 0..2 {
            bodies.get_or_parse(&large, || parse(&large)).unwrap();
        }
        assert_eq!(parses.get(), 5);
    }
}
