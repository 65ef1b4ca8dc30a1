//! Message data: anything accepted must re-encode to exactly itself.
#![no_main]
use csm_actors::proto::data::{DataLimits, MessageData};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DataLimits { max_bytes: 1 << 16, max_attachments: 16 };
    if let Ok(parsed) = MessageData::parse(data, limits) {
        assert_eq!(parsed.encode().unwrap(), data);
    }
    let _ = csm_actors::proto::mutf8::validate(data);
});
