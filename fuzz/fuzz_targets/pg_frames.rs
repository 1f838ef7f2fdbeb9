//! A stream of typed PostgreSQL messages, as the relay walks it.
#![no_main]

use breakglass_gateway_postgres::codec::{decode_frame, parse_error_fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some(f)) = decode_frame(&data[at..], 1 << 20) {
        assert!(f.len >= 5 && at + f.len <= data.len());
        let payload = f.payload(&data[at..]);
        if f.tag == b'E' || f.tag == b'N' {
            let _ = parse_error_fields(payload);
        }
        at += f.len;
    }
});
