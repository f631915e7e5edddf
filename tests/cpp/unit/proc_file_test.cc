// util/proc_file.h: the locale-free readers of /proc and /sys files.
#include "util/proc_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <string>

namespace kvxfer::procfs {
namespace {

std::string tempFile(const std::string& text) {
    char path[] = "/tmp/kvxfer-procfs-XXXXXX";
    const int fd = ::mkstemp(path);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
    ::close(fd);
    return path;
}

TEST(ProcFile, FieldsAreWhitespaceSeparated) {
    EXPECT_EQ(field("4096\t131072 6291456\n", 0), "4096");
    EXPECT_EQ(field("4096\t131072 6291456\n", 2), "6291456");
    EXPECT_EQ(field("  a  b ", 1), "b");
    EXPECT_EQ(field("a b", 2), "");
    EXPECT_EQ(field("", 0), "");
}

TEST(ProcFile, NumbersMustBeWholeFields) {
    EXPECT_EQ(toNumber("6291456"), 6291456);
    EXPECT_EQ(toNumber("-3"), -3);
    EXPECT_EQ(toNumber(""), std::nullopt);
    EXPECT_EQ(toNumber("12ab"), std::nullopt);
    EXPECT_EQ(toNumber("99999999999999999999999"), std::nullopt);  // out of range
}

TEST(ProcFile, ReadNumberOfAFile) {
    const std::string path = tempFile("4096 131072 6291456\n");
    EXPECT_EQ(readNumber(path.c_str(), 2), 6291456);
    EXPECT_EQ(readNumber(path.c_str(), 3), std::nullopt);
    EXPECT_EQ(readFile(path.c_str()), "4096 131072 6291456\n");
    EXPECT_EQ(readFile(path.c_str(), 4), "4096");  // at most max bytes
    std::remove(path.c_str());
    EXPECT_EQ(readFile(path.c_str()), std::nullopt);
    EXPECT_EQ(readNumber(path.c_str()), std::nullopt);
}

TEST(ProcFile, ReadsRealProcFiles) {
    // /proc files report size 0 and must be read until EOF.
    const auto stat = readFile("/proc/self/stat");
    ASSERT_TRUE(stat.has_value());
    const auto close = stat->rfind(')');
    ASSERT_NE(close, std::string::npos);
    const auto pid = toNumber(field(*stat, 0));
    EXPECT_EQ(pid, static_cast<long long>(::getpid()));
    const auto start = toNumber(field(std::string_view(*stat).substr(close + 1), 19));  // starttime
    ASSERT_TRUE(start.has_value());
    EXPECT_GT(*start, 0);
}

}  // namespace
}  // namespace kvxfer::procfs
