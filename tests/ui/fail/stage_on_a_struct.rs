use treadle::prelude::*;

#[derive(Serialize, Deserialize)]
struct Doc {
    id: String,
}

impl WorkItem for Doc {
    fn id(&self) -> &str {
        &self.id
    }
}

#[stage]
struct Scan;

fn main() {}
