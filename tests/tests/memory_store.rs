//! The shared store suite on the in-memory store, on a multi-thread runtime
//! (every attempt in a task of its own) and on a current-thread one (where
//! the engine first polls each attempt inline and commits at once), and on
//! a store split into lanes.

mod store_suite;
mod support;

store_suite!(async { (treadle::MemoryStore::new(), ()) });

mod inline {
    use crate::store_suite;

    store_suite!(current_thread: async { (treadle::MemoryStore::new(), ()) });
}

/// The whole suite on a store split into three lanes, worked in parallel.
mod lanes {
    use crate::store_suite;

    store_suite!(async { (treadle::MemoryStore::with_lanes(3), ()) });
}

/// The whole suite on a store split into two lanes whose loops share one
/// thread.
mod lanes_on_one_thread {
    use crate::store_suite;

    store_suite!(current_thread: async { (treadle::MemoryStore::with_lanes(2), ()) });
}
