use treadle::prelude::*;

fn main() {
    let _p = pipeline! { a -> -> b };
}
