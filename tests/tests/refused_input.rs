//! Input that would corrupt the audit trail or name nothing is refused with
//! a typed error and changes nothing: a blank reviewer, the reviewer name
//! reserved for review deadlines, a blank rejection reason, an empty item id.

mod support;

use support::{Doc, doc, done, engine, stage};
use treadle::{
    DEADLINE_REVIEWER, Decision, Error, ItemState, MemoryStore, Pipeline, ReviewRequest,
    StageOutcome,
};

fn review_pipeline() -> Pipeline<Doc> {
    Pipeline::builder()
        .stage(stage("review", |_, _| async {
            Ok(StageOutcome::needs_review(ReviewRequest::new("check")))
        }))
        .stage(done("export"))
        .edge("review", "export")
        .build()
        .unwrap()
}

#[tokio::test]
async fn blank_and_reserved_reviewers_and_blank_reasons_are_refused() {
    let engine = engine(review_pipeline(), MemoryStore::new());
    engine.submit(doc("d")).await.unwrap();
    engine.run_until_idle().await.unwrap();
    let before = engine.status("d").await.unwrap();
    assert_eq!(before.state, ItemState::AwaitingReview);

    for name in ["", "  "] {
        let refused = engine.approve("d", "review", Decision::by(name)).await;
        assert!(matches!(refused, Err(Error::BlankReviewer)), "{refused:?}");
        let refused = engine
            .approve_with_edits("d", "review", Decision::by(name), [1])
            .await;
        assert!(matches!(refused, Err(Error::BlankReviewer)), "{refused:?}");
    }
    let refused = engine
        .approve("d", "review", Decision::by(DEADLINE_REVIEWER))
        .await;
    match refused {
        Err(error @ Error::ReservedReviewer(_)) => {
            assert!(error.to_string().contains(DEADLINE_REVIEWER), "{error}")
        }
        other => panic!("expected ReservedReviewer, got {other:?}"),
    }
    let refused = engine
        .reject("d", "review", Decision::by(DEADLINE_REVIEWER), "late")
        .await;
    assert!(matches!(refused, Err(Error::ReservedReviewer(_))));
    for reason in ["", " \n"] {
        let refused = engine
            .reject("d", "review", Decision::by("alice"), reason)
            .await;
        assert!(
            matches!(refused, Err(Error::BlankRejectReason)),
            "{refused:?}"
        );
    }
    assert_eq!(engine.status("d").await.unwrap(), before, "nothing changed");

    engine
        .reject("d", "review", Decision::by("alice"), "wrong tags")
        .await
        .unwrap();
    let status = engine.status("d").await.unwrap();
    assert_eq!(
        status.stages[0].last_error.as_deref(),
        Some("rejected by alice: wrong tags")
    );
}

#[tokio::test]
async fn an_empty_item_id_refuses_the_whole_batch() {
    let engine = engine(review_pipeline(), MemoryStore::new());
    let refused = engine.submit(doc("")).await;
    assert!(matches!(refused, Err(Error::EmptyItemId)), "{refused:?}");
    let refused = engine.submit_all([doc("ok"), doc("")]).await;
    assert!(matches!(refused, Err(Error::EmptyItemId)), "{refused:?}");
    assert!(matches!(
        engine.status("ok").await,
        Err(Error::UnknownItem(_))
    ));
    assert!(engine.submit(doc("ok")).await.unwrap());
}
