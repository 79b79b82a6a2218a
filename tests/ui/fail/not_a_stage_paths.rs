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
async fn scan(_item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
    Ok(StageOutcome::complete())
}

mod stages {
    use super::Doc;
    use treadle::prelude::*;

    /// A stage written by hand: it implements `Stage` but is not a `#[stage]`
    /// type, so `pipeline!` cannot construct it (use `Pipeline::builder()`).
    pub struct Manual;

    #[treadle::__private::async_trait]
    impl Stage<Doc> for Manual {
        fn name(&self) -> &str {
            "manual"
        }

        async fn run(&self, _item: &Doc, _ctx: &mut StageContext) -> treadle::Result<StageOutcome> {
            Ok(StageOutcome::complete())
        }
    }

    #[stage]
    async fn private(_item: &Doc) -> treadle::Result<StageOutcome> {
        Ok(StageOutcome::complete())
    }
}

fn main() {
    let _first = pipeline! { scan -> stages::Manual };
    let _second = pipeline! { scan -> stages::private };
    let _third = pipeline! { scan -> stages::missing };
}
