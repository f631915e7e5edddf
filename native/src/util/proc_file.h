// Small /proc and /sys files read with POSIX calls, not iostreams.
//
// Why not std::ifstream: number extraction goes through the locale's num_get facet. A
// Python module that carries a static libstdc++ (as the 2 x H200 machine's build did, its
// toolchain linking libstdc++ statically) while the process has also loaded the system's
// shared one can then mix the two copies' locale data: `ifstream >> long` crashed there
// in engine creation (docs/gpu.md). These helpers use no locale at all.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

namespace kvxfer::procfs {

// At most `max` bytes of the file at `path`; nullopt when it cannot be opened or read.
inline std::optional<std::string> readFile(const char* path, size_t max = 4096) {
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return std::nullopt;
    std::string out(max, '\0');
    size_t got = 0;
    while (got < max) {
        const ssize_t n = ::read(fd, out.data() + got, max - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            ::close(fd);
            return std::nullopt;
        }
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    ::close(fd);
    out.resize(got);
    return out;
}

// The `index`-th (0-based) whitespace-separated field of `text`; empty when there is none.
inline std::string_view field(std::string_view text, int index) {
    size_t pos = 0;
    for (int i = 0;; ++i) {
        pos = text.find_first_not_of(" \t\n", pos);
        if (pos == std::string_view::npos) return {};
        const size_t end = std::min(text.find_first_of(" \t\n", pos), text.size());
        if (i == index) return text.substr(pos, end - pos);
        pos = end;
    }
}

// The field as a decimal integer; nullopt when it is empty or not entirely a number.
inline std::optional<long long> toNumber(std::string_view f) {
    if (f.empty() || f.size() > 30) return std::nullopt;
    const std::string s(f);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (errno != 0 || end != s.c_str() + s.size()) return std::nullopt;
    return v;
}

// The `index`-th number of the file at `path` (e.g. tcp_rmem's maximum is index 2).
inline std::optional<long long> readNumber(const char* path, int index = 0) {
    const auto text = readFile(path);
    if (!text) return std::nullopt;
    return toNumber(field(*text, index));
}

}  // namespace kvxfer::procfs
