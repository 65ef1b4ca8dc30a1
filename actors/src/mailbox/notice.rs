//! The one encoding of `MessageAvailable`, which both backends' mailbox
//! actors send: one frame per entry, or a batch for a sign-on list.

use super::Entry;

impl Entry {
    /// This entry's `MessageAvailable`, appended to `frames`.
    pub fn write_notice(&self, frames: &mut Vec<u8>) {
        write_notice(&self.id, &self.from, self.size, frames);
    }

    /// This entry's `MessageAvailable` as one frame.
    pub fn notice(&self) -> bytes::Bytes {
        notice_frame(&self.id, &self.from, self.size)
    }
}

/// The one encoding of a `MessageAvailable` notice, appended to `frames`;
/// both backends' mailbox actors announce through it.
pub fn write_notice(id: &str, from: &str, size: u64, frames: &mut Vec<u8>) {
    crate::proto::Packet::MessageAvailable {
        id: id.to_owned(),
        from: from.to_owned(),
        size,
    }
    .write_frame(frames);
}

/// [`write_notice`] as one frame of its own.
pub fn notice_frame(id: &str, from: &str, size: u64) -> bytes::Bytes {
    let mut frame = Vec::new();
    write_notice(id, from, size, &mut frame);
    bytes::Bytes::from(frame)
}

/// Queues one `MessageAvailable` per entry, oldest first, as one batch.
pub fn queue_notices<'a>(
    outbound: &crate::outbound::Outbound,
    entries: impl IntoIterator<Item = &'a Entry>,
) {
    let mut frames = Vec::new();
    for entry in entries {
        entry.write_notice(&mut frames);
    }
    if !frames.is_empty() {
        outbound.push(bytes::Bytes::from(frames));
    }
}
