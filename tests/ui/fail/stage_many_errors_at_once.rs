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

#[stage(retries = 3, retries = 4, colour = "blue")]
fn scan(_item: Doc, _extra: u8, _more: u8) -> String {
    String::new()
}

fn main() {}
