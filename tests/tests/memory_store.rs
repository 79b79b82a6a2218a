//! The shared store suite on the in-memory store.

mod store_suite;
mod support;

store_suite!(async { (treadle::MemoryStore::new(), ()) });
