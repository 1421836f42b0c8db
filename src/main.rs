fn main() {
    std::process::exit(dmd2::cli::main_with_args(std::env::args_os()));
}
