//! Session frames and packets: any bytes, read as a stream of frames.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let mut reader = data;
        while let Ok(Some(body)) =
            csm_actors::proto::frame::read_frame(&mut reader, 4096, std::time::Duration::from_secs(1)).await
        {
            let _ = csm_actors::proto::Packet::decode(&body);
        }
    });
    let _ = csm_actors::proto::Packet::decode(data);
});
