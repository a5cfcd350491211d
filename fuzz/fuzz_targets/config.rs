//! `tollgate.toml`: any text must give a config or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = tollgate::config::Config::parse(text, "fuzz.toml");
});
