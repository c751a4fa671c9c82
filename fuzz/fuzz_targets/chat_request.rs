#![no_main]
#[path = "../cases.rs"]
mod cases;
libfuzzer_sys::fuzz_target!(|data: &[u8]| cases::chat_request(data));
