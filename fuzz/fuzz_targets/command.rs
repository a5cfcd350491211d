//! The slash-command parser: any text a user can type.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = tollgate::domain::command::parse(text);
});
