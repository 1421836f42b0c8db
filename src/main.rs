/// Big blocks freed by one layer or step are reused by the next (see `memory::BlockCache`).
#[global_allocator]
static ALLOC: dmd2::memory::BlockCache = dmd2::memory::BlockCache;

fn main() {
    std::process::exit(dmd2::cli::main_with_args(std::env::args_os()));
}
