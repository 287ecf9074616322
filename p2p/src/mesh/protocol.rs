//! The `/arcade/chunks/1` wire protocol: one request, one response per stream, each a
//! protobuf message (`ChunkRequest` / `ChunkResponse` in `mesh.proto`) preceded by its
//! length as a 4-byte big-endian integer. Lengths are checked before anything is
//! allocated: requests are at most [`MAX_REQUEST_BYTES`], responses at most
//! [`MAX_RESPONSE_BYTES`] (one chunk of the largest chunk size plus framing).

use std::io;

use arcade_proto::v1 as pb;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use prost::Message as _;

use crate::manifest::MAX_CHUNK_SIZE;

/// The protocol name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/arcade/chunks/1");
/// Largest request accepted (a ticket, a content id and an index).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Largest response accepted: one chunk plus framing.
pub const MAX_RESPONSE_BYTES: usize = MAX_CHUNK_SIZE as usize + 64 * 1024;

/// Reads one length-prefixed message of at most `max` bytes.
pub async fn read_message<T, M>(io: &mut T, max: usize) -> io::Result<M>
where
    T: AsyncRead + Unpin,
    M: prost::Message + Default,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    // A chunk-sized message is read into a reused buffer (every byte is overwritten).
    let mut buf = super::buffers::BufferPool::shared().take(len);
    io.read_exact(&mut buf).await?;
    // Decoding from `Bytes` hands `bytes` fields declared as `Bytes` (a chunk's data,
    // see proto/build.rs) out as slices of `buf`: the chunk is not copied again, and the
    // buffer returns to the pool when the chunk is dropped.
    M::decode(buf.freeze()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes one length-prefixed message (refusing to send more than `max` bytes) and
/// closes the stream.
pub async fn write_message<T, M>(io: &mut T, msg: &M, max: usize) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: prost::Message,
{
    write_frame(io, msg, max).await?;
    io.close().await
}

/// Writes one length-prefixed message (refusing to send more than `max` bytes) and
/// flushes it, leaving the stream open for more.
pub async fn write_frame<T, M>(io: &mut T, msg: &M, max: usize) -> io::Result<()>
where
    T: AsyncWrite + Unpin,
    M: prost::Message,
{
    let len = msg.encoded_len();
    check_len(len, max)?;
    let mut framed = Vec::with_capacity(4 + len);
    framed.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut framed)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&framed).await?;
    io.flush().await
}

fn check_len(len: usize, max: usize) -> io::Result<()> {
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    Ok(())
}

/// The length prefix and protobuf encoding of a chunk response around the chunk's
/// bytes — what comes before them and what comes after (the `encoding` field): exactly
/// the bytes `encode_to_vec` would write, so a chunk goes to the stream straight from
/// its buffer instead of through a copy.
fn chunk_response_head(index: u32, encoding: i32, data_len: usize) -> (Vec<u8>, Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let fields = pb::ChunkData {
        index,
        ..Default::default()
    }
    .encode_to_vec();
    let tail = pb::ChunkData {
        encoding,
        ..Default::default()
    }
    .encode_to_vec();
    let data_key = if data_len == 0 {
        0
    } else {
        1 + encoded_len_varint(data_len as u64)
    };
    let inner = fields.len() + data_key + data_len + tail.len();
    let total = 1 + encoded_len_varint(inner as u64) + inner;
    let mut head = Vec::with_capacity(4 + 16 + fields.len());
    head.extend_from_slice(&(total as u32).to_be_bytes());
    encode_key(2, WireType::LengthDelimited, &mut head);
    encode_varint(inner as u64, &mut head);
    head.extend_from_slice(&fields);
    if data_len > 0 {
        encode_key(2, WireType::LengthDelimited, &mut head);
        encode_varint(data_len as u64, &mut head);
    }
    (head, tail)
}

/// Writes a response; a chunk is written from its own buffer (no encoding copy).
pub async fn write_response<T>(io: &mut T, res: &pb::ChunkResponse) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
{
    let Some(pb::chunk_response::Kind::Chunk(c)) = &res.kind else {
        return write_message(io, res, MAX_RESPONSE_BYTES).await;
    };
    let (head, tail) = chunk_response_head(c.index, c.encoding, c.data.len());
    check_len(
        head.len() - 4 + c.data.len() + tail.len(),
        MAX_RESPONSE_BYTES,
    )?;
    io.write_all(&head).await?;
    io.write_all(&c.data).await?;
    io.write_all(&tail).await?;
    io.close().await
}

/// Framing allowed on top of a response's data (index, lengths, tags).
const RESPONSE_FRAMING: usize = 1024;

/// The request-response codec of the protocol. libp2p uses one clone of it per
/// outbound stream, writing the request and then reading the response, so the request
/// sets the largest response read: its `expect_bytes` plus framing (a refusal's
/// message fits the framing), never more than [`MAX_RESPONSE_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct ChunkCodec {
    response_limit: usize,
}

impl Default for ChunkCodec {
    fn default() -> Self {
        Self {
            response_limit: MAX_RESPONSE_BYTES,
        }
    }
}

/// The largest response to `req`.
pub fn response_limit(req: &pb::ChunkRequest) -> usize {
    match req.expect_bytes {
        0 => MAX_RESPONSE_BYTES,
        n => (n as usize)
            .saturating_add(RESPONSE_FRAMING)
            .min(MAX_RESPONSE_BYTES),
    }
}

#[async_trait::async_trait]
impl libp2p::request_response::Codec for ChunkCodec {
    type Protocol = StreamProtocol;
    type Request = pb::ChunkRequest;
    type Response = pb::ChunkResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<pb::ChunkRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, MAX_REQUEST_BYTES).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<pb::ChunkResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.response_limit).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: pb::ChunkRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.response_limit = response_limit(&req);
        write_message(io, &req, MAX_REQUEST_BYTES).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: pb::ChunkResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_response(io, &res).await
    }
}

/// A refusal response.
pub fn refused(reason: pb::Refusal, message: impl Into<String>) -> pb::ChunkResponse {
    pb::ChunkResponse {
        kind: Some(pb::chunk_response::Kind::Refused(pb::Refused {
            reason: reason as i32,
            message: message.into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_limits() {
        futures::executor::block_on(async {
            let req = pb::ChunkRequest {
                ticket: vec![1; 100],
                content: vec![2; 32],
                kind: Some(pb::chunk_request::Kind::Chunk(7)),
                expect_bytes: 0,
                accept_zstd: true,
            };
            assert_eq!(response_limit(&req), MAX_RESPONSE_BYTES);
            let asked = pb::ChunkRequest {
                expect_bytes: 1000,
                ..req.clone()
            };
            assert_eq!(response_limit(&asked), 1000 + RESPONSE_FRAMING);
            let absurd = pb::ChunkRequest {
                expect_bytes: u32::MAX,
                ..req.clone()
            };
            assert_eq!(response_limit(&absurd), MAX_RESPONSE_BYTES);
            let mut buf = Cursor::new(Vec::new());
            write_message(&mut buf, &req, MAX_REQUEST_BYTES)
                .await
                .unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            let back: pb::ChunkRequest = read_message(&mut rd, MAX_REQUEST_BYTES).await.unwrap();
            assert_eq!(back, req);

            // An oversized length prefix is refused before allocating.
            let mut huge = Cursor::new(u32::MAX.to_be_bytes().to_vec());
            let err = read_message::<_, pb::ChunkRequest>(&mut huge, MAX_REQUEST_BYTES)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // Sending an oversized message is refused too.
            let big = pb::ChunkRequest {
                ticket: vec![0; MAX_REQUEST_BYTES],
                ..Default::default()
            };
            let mut sink = Cursor::new(Vec::new());
            assert!(
                write_message(&mut sink, &big, MAX_REQUEST_BYTES)
                    .await
                    .is_err()
            );
            // Truncated input is an error, not a hang or a panic.
            let mut short = Cursor::new(vec![0, 0, 0, 10, 1, 2]);
            assert!(
                read_message::<_, pb::ChunkRequest>(&mut short, MAX_REQUEST_BYTES)
                    .await
                    .is_err()
            );
        });
    }

    proptest! {
        #[test]
        fn chunk_responses_are_written_exactly_as_prost_encodes_them(
            index in any::<u32>(),
            len in prop_oneof![Just(0usize), 1usize..300, Just(1 << 20)],
            encoding in 0i32..2,
        ) {
            let res = pb::ChunkResponse {
                kind: Some(pb::chunk_response::Kind::Chunk(pb::ChunkData {
                    index,
                    data: (0..len).map(|i| i as u8).collect::<Vec<u8>>().into(),
                    encoding,
                })),
            };
            let mut ours = Cursor::new(Vec::new());
            futures::executor::block_on(write_response(&mut ours, &res)).unwrap();
            let mut expected = (res.encoded_len() as u32).to_be_bytes().to_vec();
            expected.extend(res.encode_to_vec());
            prop_assert_eq!(ours.get_ref(), &expected);
            let mut rd = Cursor::new(ours.into_inner());
            let back: pb::ChunkResponse =
                futures::executor::block_on(read_message(&mut rd, MAX_RESPONSE_BYTES)).unwrap();
            prop_assert_eq!(back, res);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            futures::executor::block_on(async {
                let _ = read_message::<_, pb::ChunkRequest>(&mut Cursor::new(bytes.clone()), MAX_REQUEST_BYTES).await;
                let _ = read_message::<_, pb::ChunkResponse>(&mut Cursor::new(bytes), MAX_RESPONSE_BYTES).await;
            });
        }
    }
}
