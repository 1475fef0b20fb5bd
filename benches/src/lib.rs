//! switchyard benchmarks. `cargo bench -p switchyard-benches` runs the criterion
//! micro-benchmarks of the request hot path (`benches/hot_path.rs`).
