//! Interaction bodies as Slack posts them (form field `payload` holding
//! JSON), through to the modal's reading of a submission.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Some((raw, _)) = tollgate::slack::routes::decode_interaction(body) {
        let _ = tollgate::slack::modal::parse_submission(&raw);
    }
    // The payload alone too, so the fuzzer need not learn URL encoding to
    // reach the JSON side.
    if let Ok(raw) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = tollgate::slack::modal::parse_submission(&raw);
    }
});
