//! The codec of every ironmesh service: prost, with smaller buffers than
//! tonic's defaults.
//!
//! tonic gives every call an encode and a decode buffer of 8 KiB and
//! batches encoded messages up to 32 KiB before handing them to HTTP/2; a
//! streaming call keeps the capacity it grew to for its whole life. A
//! controller holds a sync stream per node, so at 1,000 nodes those
//! buffers were ~50 MB of its memory (docs/scale.md). Buffers still grow
//! to the largest message a call carries; they just start small and do
//! not batch.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial capacity of a call's encode and decode buffers.
pub const BUFFER_BYTES: usize = 1 << 10;
/// Encoded bytes gathered before they are handed to HTTP/2: one message
/// at a time unless many small ones are ready together.
pub const YIELD_BYTES: usize = 4 << 10;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

/// `application/grpc+proto` via prost, with [`BUFFER_BYTES`] and
/// [`YIELD_BYTES`].
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codec::{Decoder, Encoder};

    #[test]
    fn uses_the_small_buffers() {
        let mut c = LeanCodec::<crate::v1::Assignment, crate::v1::Assignment>::default();
        for s in [c.encoder().buffer_settings(), c.decoder().buffer_settings()] {
            let dbg = format!("{s:?}");
            assert!(
                dbg.contains(&format!("buffer_size: {BUFFER_BYTES}")),
                "{dbg}"
            );
            assert!(
                dbg.contains(&format!("yield_threshold: {YIELD_BYTES}")),
                "{dbg}"
            );
        }
    }
}
