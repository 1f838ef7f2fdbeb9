//! Start-up packets of the PostgreSQL gateway: never panic, never read past
//! the declared length.
#![no_main]

use breakglass_gateway_postgres::codec::decode_startup;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = decode_startup(data) {
        assert!(used <= data.len());
    }
});
