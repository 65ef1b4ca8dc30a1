//! Message-stream lines: any bytes, read line by line within the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(16, data);
        while let Ok(line) = csm_actors::proto::lines::read_line(&mut reader, 64).await {
            assert!(line.len() <= 64);
            let _ = csm_actors::proto::lines::StreamError::parse(&line);
        }
    });
});
