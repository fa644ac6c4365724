//! Host tensors: what a request's inputs and outputs are between the wire and the device.
//!
//! The gateway's front ends decode JSON or raw bytes into [`HostTensor`]s; models read them
//! in [`crate::Model::prepare`] and return them from [`crate::Model::forward`]. The raw
//! binary layout here is the one of KServe v2 (the Open Inference Protocol), used by gRPC's
//! `raw_input_contents` / `raw_output_contents` and by the HTTP binary-data extension, so the
//! same codec serves the QUIC front end and the upstream client.
//!
//! Decoding is the first thing that touches a client's bytes, so [`HostTensor::from_raw`]
//! never panics and never allocates more than the input's length implies.

use bytes::BufMut;

use crate::error::InputError;

/// An element type, named as in KServe v2. FP16/BF16 are not supported yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DataType {
    /// `BOOL`: one byte, 0 or 1.
    Bool,
    /// `UINT8`.
    Uint8,
    /// `UINT16`.
    Uint16,
    /// `UINT32`.
    Uint32,
    /// `UINT64`.
    Uint64,
    /// `INT8`.
    Int8,
    /// `INT16`.
    Int16,
    /// `INT32`.
    Int32,
    /// `INT64`.
    Int64,
    /// `FP32`.
    Fp32,
    /// `FP64`.
    Fp64,
    /// `BYTES`: variable-length byte strings.
    Bytes,
}

impl DataType {
    /// Every datatype, in declaration order.
    pub const ALL: [DataType; 12] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The KServe v2 name: `"BOOL"`, `"UINT8"`, …, `"FP32"`, `"FP64"`, `"BYTES"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a KServe v2 name, exactly as [`DataType::as_str`] writes it (upper case, as the
    /// protocol specifies). `None` for anything else, including unsupported `FP16`/`BF16`.
    pub fn parse(s: &str) -> Option<Self> {
        DataType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Bytes per element in the raw layout; `None` for `BYTES`, whose elements vary.
    pub fn byte_size(&self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tensor's elements in row-major order, one variant per [`DataType`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum TensorData {
    /// `BOOL`.
    Bool(Vec<bool>),
    /// `UINT8`.
    U8(Vec<u8>),
    /// `UINT16`.
    U16(Vec<u16>),
    /// `UINT32`.
    U32(Vec<u32>),
    /// `UINT64`.
    U64(Vec<u64>),
    /// `INT8`.
    I8(Vec<i8>),
    /// `INT16`.
    I16(Vec<i16>),
    /// `INT32`.
    I32(Vec<i32>),
    /// `INT64`.
    I64(Vec<i64>),
    /// `FP32`.
    F32(Vec<f32>),
    /// `FP64`.
    F64(Vec<f64>),
    /// `BYTES`.
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    /// `n` zero elements (`false` for `BOOL`) of `datatype`; `None` for
    /// `BYTES`, whose elements have no zero.
    pub fn zeros(datatype: DataType, n: usize) -> Option<TensorData> {
        Some(match datatype {
            DataType::Bool => TensorData::Bool(vec![false; n]),
            DataType::Uint8 => TensorData::U8(vec![0; n]),
            DataType::Uint16 => TensorData::U16(vec![0; n]),
            DataType::Uint32 => TensorData::U32(vec![0; n]),
            DataType::Uint64 => TensorData::U64(vec![0; n]),
            DataType::Int8 => TensorData::I8(vec![0; n]),
            DataType::Int16 => TensorData::I16(vec![0; n]),
            DataType::Int32 => TensorData::I32(vec![0; n]),
            DataType::Int64 => TensorData::I64(vec![0; n]),
            DataType::Fp32 => TensorData::F32(vec![0.0; n]),
            DataType::Fp64 => TensorData::F64(vec![0.0; n]),
            DataType::Bytes => return None,
        })
    }

    /// The datatype of the elements.
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::U8(_) => DataType::Uint8,
            TensorData::U16(_) => DataType::Uint16,
            TensorData::U32(_) => DataType::Uint32,
            TensorData::U64(_) => DataType::Uint64,
            TensorData::I8(_) => DataType::Int8,
            TensorData::I16(_) => DataType::Int16,
            TensorData::I32(_) => DataType::Int32,
            TensorData::I64(_) => DataType::Int64,
            TensorData::F32(_) => DataType::Fp32,
            TensorData::F64(_) => DataType::Fp64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::Bool(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::U16(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::U64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A named tensor in host memory.
///
/// Invariant kept by [`HostTensor::new`] and [`HostTensor::from_raw`] (the fields are public
/// for pattern matching; code that sets them by hand must keep it too): the number of
/// elements equals the product of `shape`, and no `BYTES` element is longer than
/// `u32::MAX` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// The tensor's name, e.g. `INPUT0`.
    pub name: String,
    /// Its dimensions; `[]` is a scalar.
    pub shape: Vec<usize>,
    /// Its elements, row-major.
    pub data: TensorData,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` has exactly `product(shape)` elements and that
    /// no `BYTES` element is too long for the raw layout.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<Self, InputError> {
        let name = name.into();
        let Some(expected) = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
            return Err(InputError::ShapeOverflow {
                name,
                shape: shape
                    .iter()
                    .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                    .collect(),
            });
        };
        if data.len() != expected {
            return Err(InputError::ElementCount {
                name,
                shape,
                expected,
                got: data.len(),
            });
        }
        if let TensorData::Bytes(elements) = &data
            && let Some((index, e)) = elements
                .iter()
                .enumerate()
                .find(|(_, e)| u32::try_from(e.len()).is_err())
        {
            return Err(InputError::BytesElementTooLong {
                name,
                index,
                len: e.len(),
            });
        }
        Ok(HostTensor { name, shape, data })
    }

    /// The datatype of the elements.
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Decodes KServe v2 raw binary contents (gRPC `raw_input_contents`, the HTTP
    /// binary-data extension): elements little-endian in row-major order; `BOOL` one byte,
    /// 0 or 1; each `BYTES` element a 4-byte little-endian length followed by that many
    /// bytes.
    ///
    /// Errors (never panics) if a dimension is negative, the shape's element count
    /// overflows, the byte length does not fit shape × datatype, a `BYTES` length prefix is
    /// cut off or runs past the buffer, or bytes are left over. Allocates at most about
    /// `raw.len()` bytes of elements (plus one `Vec` header per `BYTES` element, of which
    /// there are at most `raw.len() / 4`), whatever the shape claims.
    pub fn from_raw(
        name: impl Into<String>,
        datatype: DataType,
        shape: &[i64],
        raw: &[u8],
    ) -> Result<Self, InputError> {
        let name = name.into();
        let mut dims = Vec::with_capacity(shape.len());
        for &d in shape {
            match usize::try_from(d) {
                Ok(d) => dims.push(d),
                Err(_) => {
                    return Err(InputError::NegativeDimension {
                        name,
                        shape: shape.to_vec(),
                    });
                }
            }
        }
        let Some(count) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
            return Err(InputError::ShapeOverflow {
                name,
                shape: shape.to_vec(),
            });
        };
        if let Some(size) = datatype.byte_size() {
            let expected = count
                .checked_mul(size)
                .ok_or_else(|| InputError::ShapeOverflow {
                    name: name.clone(),
                    shape: shape.to_vec(),
                })?;
            if raw.len() != expected {
                return Err(InputError::RawSize {
                    name,
                    expected,
                    got: raw.len(),
                });
            }
        }
        let data = decode(&name, datatype, count, raw)?;
        Ok(HostTensor {
            name,
            shape: dims,
            data,
        })
    }

    /// The length in bytes of [`HostTensor::to_raw`]'s output.
    pub fn raw_len(&self) -> usize {
        match &self.data {
            TensorData::Bytes(v) => v.iter().map(|e| 4 + e.len()).sum(),
            other => {
                // Every non-BYTES datatype has a fixed size.
                other.len() * other.datatype().byte_size().unwrap_or(0)
            }
        }
    }

    /// Encodes the elements in the KServe v2 raw binary layout (see
    /// [`HostTensor::from_raw`]); `from_raw(name, datatype, shape, &to_raw())` gives the
    /// tensor back.
    ///
    /// # Panics
    ///
    /// If a `BYTES` element is longer than `u32::MAX` bytes, which [`HostTensor::new`] and
    /// [`HostTensor::from_raw`] rule out; for a tensor whose fields were set by hand use
    /// [`HostTensor::try_to_raw`].
    #[allow(
        clippy::expect_used,
        reason = "the invariant of every constructor; callers that set fields by hand use try_to_raw"
    )]
    pub fn to_raw(&self) -> Vec<u8> {
        self.try_to_raw()
            .expect("HostTensor invariant: BYTES elements fit a u32 length prefix")
    }

    /// Like [`HostTensor::to_raw`], but a `BYTES` element longer than `u32::MAX` bytes is an
    /// error rather than a panic.
    pub fn try_to_raw(&self) -> Result<Vec<u8>, InputError> {
        let mut out = Vec::with_capacity(self.raw_len());
        self.write_raw(&mut out)?;
        Ok(out)
    }

    /// Appends [`HostTensor::try_to_raw`]'s bytes to `out` without an
    /// intermediate buffer: an encoder that knows [`HostTensor::raw_len`]
    /// writes the elements straight into its frame. On error (a `BYTES`
    /// element longer than `u32::MAX` bytes) `out` may hold a prefix.
    pub fn write_raw<B: BufMut>(&self, out: &mut B) -> Result<(), InputError> {
        match &self.data {
            TensorData::Bool(v) => v.iter().for_each(|&b| out.put_u8(u8::from(b))),
            TensorData::U8(v) => out.put_slice(v),
            TensorData::U16(v) => v.iter().for_each(|&x| out.put_u16_le(x)),
            TensorData::U32(v) => v.iter().for_each(|&x| out.put_u32_le(x)),
            TensorData::U64(v) => v.iter().for_each(|&x| out.put_u64_le(x)),
            TensorData::I8(v) => v.iter().for_each(|&x| out.put_i8(x)),
            TensorData::I16(v) => v.iter().for_each(|&x| out.put_i16_le(x)),
            TensorData::I32(v) => v.iter().for_each(|&x| out.put_i32_le(x)),
            TensorData::I64(v) => v.iter().for_each(|&x| out.put_i64_le(x)),
            TensorData::F32(v) => v.iter().for_each(|&x| out.put_f32_le(x)),
            TensorData::F64(v) => v.iter().for_each(|&x| out.put_f64_le(x)),
            TensorData::Bytes(v) => {
                for (index, e) in v.iter().enumerate() {
                    let len =
                        u32::try_from(e.len()).map_err(|_| InputError::BytesElementTooLong {
                            name: self.name.clone(),
                            index,
                            len: e.len(),
                        })?;
                    out.put_u32_le(len);
                    out.put_slice(e);
                }
            }
        }
        Ok(())
    }
}

/// Decodes `count` elements of `datatype`; for fixed-size datatypes the caller has checked
/// that `raw.len()` is `count` × the element size.
fn decode(
    name: &str,
    datatype: DataType,
    count: usize,
    raw: &[u8],
) -> Result<TensorData, InputError> {
    // `chunks_exact` hands out exactly N bytes, so the array conversion cannot fail; the
    // fallback keeps the decoder free of panics all the same.
    fn le<const N: usize, T>(raw: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        raw.chunks_exact(N)
            .map(|c| f(c.try_into().unwrap_or([0; N])))
            .collect()
    }
    Ok(match datatype {
        DataType::Bool => {
            if let Some((index, &value)) = raw.iter().enumerate().find(|(_, b)| **b > 1) {
                return Err(InputError::BadBool {
                    name: name.to_owned(),
                    index,
                    value,
                });
            }
            TensorData::Bool(raw.iter().map(|&b| b == 1).collect())
        }
        DataType::Uint8 => TensorData::U8(raw.to_vec()),
        DataType::Uint16 => TensorData::U16(le(raw, u16::from_le_bytes)),
        DataType::Uint32 => TensorData::U32(le(raw, u32::from_le_bytes)),
        DataType::Uint64 => TensorData::U64(le(raw, u64::from_le_bytes)),
        DataType::Int8 => TensorData::I8(le(raw, i8::from_le_bytes)),
        DataType::Int16 => TensorData::I16(le(raw, i16::from_le_bytes)),
        DataType::Int32 => TensorData::I32(le(raw, i32::from_le_bytes)),
        DataType::Int64 => TensorData::I64(le(raw, i64::from_le_bytes)),
        DataType::Fp32 => TensorData::F32(le(raw, f32::from_le_bytes)),
        DataType::Fp64 => TensorData::F64(le(raw, f64::from_le_bytes)),
        DataType::Bytes => TensorData::Bytes(decode_bytes(name, count, raw)?),
    })
}

/// Decodes `count` length-prefixed BYTES elements that must use up `raw` exactly.
fn decode_bytes(name: &str, count: usize, raw: &[u8]) -> Result<Vec<Vec<u8>>, InputError> {
    // Each element takes at least its 4-byte prefix, so a shape that claims more elements
    // than that fails below; the capacity is bounded by the input, not by the shape.
    let mut elements = Vec::with_capacity(count.min(raw.len() / 4));
    let mut rest = raw;
    for index in 0..count {
        let offset = raw.len() - rest.len();
        let bad = |reason: String| InputError::BadBytesElement {
            name: name.to_owned(),
            index,
            offset,
            reason,
        };
        let Some((prefix, tail)) = rest.split_first_chunk::<4>() else {
            return Err(bad(format!(
                "length prefix needs 4 bytes, {} left",
                rest.len()
            )));
        };
        let len = u32::from_le_bytes(*prefix);
        // A u32 always fits a usize on the 32- and 64-bit targets we build for; if it did
        // not, it would be longer than any buffer and fail the next check.
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if len_usize > tail.len() {
            return Err(bad(format!(
                "length {len} runs past the end ({} bytes left)",
                tail.len()
            )));
        }
        let (element, tail) = tail.split_at(len_usize);
        elements.push(element.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(InputError::TrailingBytes {
            name: name.to_owned(),
            elements: count,
            extra: rest.len(),
        });
    }
    Ok(elements)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn zeros_of_every_datatype_but_bytes() {
        for d in DataType::ALL {
            match TensorData::zeros(d, 3) {
                Some(z) => {
                    assert_eq!((z.datatype(), z.len()), (d, 3), "{d}");
                    let raw = HostTensor::new("z", vec![3], z).unwrap().to_raw();
                    assert!(raw.iter().all(|&b| b == 0), "{d}");
                }
                None => assert_eq!(d, DataType::Bytes),
            }
        }
    }

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("fp32"), None);
        assert_eq!(DataType::parse("FP16"), None);
    }

    #[test]
    fn shape_claiming_many_bytes_elements_does_not_allocate_for_them() {
        let err = HostTensor::from_raw("x", DataType::Bytes, &[i64::MAX], &[]).unwrap_err();
        assert!(matches!(err, InputError::BadBytesElement { index: 0, .. }));
    }
}
