//! Test and simulation support, kept out of the library's default API (like redis-rs's
//! `redis-test`): throwaway `redis-server` and `app` processes, the exactly-once checker, and
//! namespace snapshots, and a TCP proxy that loses replies. Enabled by the `testkit` feature (`sim`, the tests and the benches use it).

pub mod procs;
pub mod proxy;
pub mod snapshot;
pub mod verify;
