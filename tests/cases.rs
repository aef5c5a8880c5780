mod common;

#[test]
fn bomb_speed() {
    use std::io::Write;
    let t = std::time::Instant::now();
    for level in [1u32, 6, 9] {
        let t = std::time::Instant::now();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..1024 {
            e.write_all(&chunk).unwrap();
        }
        let out = e.finish().unwrap();
        eprintln!("level {level}: {} bytes in {:?}", out.len(), t.elapsed());
    }
    eprintln!("{:?}", t.elapsed());
}
