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

mod stages {
    use super::Doc;
    use treadle::prelude::*;

    #[stage]
    pub async fn scan(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }

    pub mod nested {
        use super::super::Doc;
        use treadle::{StageContext, StageOutcome, stage};

        #[stage]
        pub(crate) async fn index(
            _item: &Doc,
            _ctx: &mut StageContext,
        ) -> treadle::Result<StageOutcome> {
            Ok(StageOutcome::complete())
        }
    }
}

fn main() {
    let pipeline = treadle::pipeline! {
        stages::scan -> crate::stages::nested::index;
    };
    assert_eq!(pipeline.definition().stages, ["scan", "index"]);
}
