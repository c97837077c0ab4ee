#![no_main]
//! `mesh_agent::fuzzing::http_head`: see there for what it reads.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::http_head(data));
