//! A key file in a directory of its own, rewritten atomically; removed on drop.

use std::path::PathBuf;

pub struct KeyFile {
    dir: PathBuf,
    pub path: PathBuf,
}

impl KeyFile {
    pub fn new(test: &str) -> KeyFile {
        let dir = std::env::temp_dir().join(format!("dl-keys-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        KeyFile {
            path: dir.join("keys.toml"),
            dir,
        }
    }

    /// Writes the file atomically (so a reload never sees half of it).
    pub fn write(&self, text: &str) {
        let tmp = self.dir.join("keys.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
