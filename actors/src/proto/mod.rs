//! The wire formats of csm, with no actor or socket inside: the session
//! stream's length-prefixed MessagePack packets, the message stream's lines,
//! and the message data in Java `DataOutputStream` form. The server, the
//! simulator, the admin client and the tests all use this one definition.

pub mod data;
pub mod frame;
pub mod lines;
pub mod msgpack;
pub mod mutf8;
pub mod names;
pub mod packet;

pub use data::{Attachment, DataError, DataLimits, MessageData};
pub use frame::{FrameError, FRAME_HEADER_LEN};
pub use packet::{Packet, PacketError, Status};
