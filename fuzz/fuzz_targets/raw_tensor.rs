//! Raw tensor contents (gRPC `raw_input_contents`, binary REST tensors, the
//! native protocol): byte 0 picks the datatype, byte 1 the rank (0..=4),
//! then one little-endian i64 per dimension, then the contents. `from_raw`
//! never panics and never allocates past what the contents' length
//! implies, whatever the shape claims; what it accepts re-encodes to the
//! very same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_protocol::{DataType, HostTensor};

fuzz_target!(|data: &[u8]| {
    let Some((&[dt, rank], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let datatype = DataType::ALL[usize::from(dt) % DataType::ALL.len()];
    let rank = usize::from(rank % 5);
    let Some((dims, raw)) = rest.split_at_checked(rank * 8) else {
        return;
    };
    let shape: Vec<i64> = dims
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Ok(t) = HostTensor::from_raw("x", datatype, &shape, raw) {
        assert_eq!(t.datatype(), datatype);
        assert_eq!(t.raw_len(), raw.len());
        assert_eq!(t.to_raw(), raw, "raw round trip");
        let elements: usize = t.shape.iter().product();
        assert_eq!(elements, t.len());
    }
});
