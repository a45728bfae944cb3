/* SPDX-License-Identifier: GPL-2.0-or-later */
/* daemon/debug-request.c: the debug socket's framing, parser, role table and status JSON. */
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "debug-request.h"
#include "macros.h"
#include "tests.h"

static int parse(const char *text, DebugRequest *req, char *error)
{
        static char line[DEBUG_LINE_MAX];

        snprintf(line, sizeof(line), "%s", text);
        error[0] = 0;
        return debug_request_parse(line, req, error, 256);
}

TEST(parse_errors)
{
        DebugRequest req;
        char error[256];

        ASSERT_EQ(parse("", &req, error), -EINVAL);
        ASSERT_TRUE(streq(error, "empty request"));
        ASSERT_EQ(parse(" \t ", &req, error), -EINVAL);
        ASSERT_TRUE(streq(error, "empty request"));
        ASSERT_EQ(parse("checkpoint", &req, error), -EINVAL);
        ASSERT_TRUE(streq(error, "'checkpoint' needs a VM name"));
        ASSERT_EQ(parse("nonsense", &req, error), -EINVAL);
        ASSERT_TRUE(streq(error, "'nonsense' needs a VM name"));
        ASSERT_EQ(parse("stall", &req, error), -EINVAL);
        ASSERT_TRUE(streq(error, "stall needs a number of seconds, 0..120"));
        ASSERT_EQ(parse("stall 121", &req, error), -EINVAL);
        ASSERT_EQ(parse("stall 5s", &req, error), -EINVAL);
        ASSERT_EQ(parse("stall 1 2", &req, error), -EINVAL);
        ASSERT_EQ(parse("stall 99999999999999999999999", &req, error), -EINVAL);
}

TEST(parse_requests)
{
        DebugRequest req;
        char error[256];

        ASSERT_OK(parse("status", &req, error));
        ASSERT_EQ(req.verb, DEBUG_STATUS);
        ASSERT_TRUE(req.vm == NULL);
        ASSERT_OK(parse("status web", &req, error));
        ASSERT_TRUE(streq(req.vm, "web"));
        ASSERT_OK(parse("stall 120", &req, error));
        ASSERT_EQ(req.verb, DEBUG_STALL);
        ASSERT_EQ(req.stall_sec, 120);
        ASSERT_OK(parse("  image\tweb /d  /p ", &req, error));
        ASSERT_EQ(req.verb, DEBUG_IMAGE);
        ASSERT_EQ(req.n_words, 4);
        ASSERT_TRUE(streq(req.vm, "web") && streq(req.words[2], "/d") && streq(req.words[3], "/p"));
        /* Words past the fifth are not looked at. */
        ASSERT_OK(parse("checkpoint web a b c d e f", &req, error));
        ASSERT_EQ(req.n_words, DEBUG_WORDS_MAX);
        /* An unknown verb parses; its answer needs the VM's role. */
        ASSERT_OK(parse("nonsense web", &req, error));
        ASSERT_EQ(req.verb, DEBUG_UNKNOWN);
        ASSERT_OK(parse("promote web force", &req, error));
        ASSERT_TRUE(req.force);
        ASSERT_OK(parse("promote web forced", &req, error));
        ASSERT_TRUE(!req.force);
}

static bool fits(const char *text, DebugRole role)
{
        DebugRequest req;
        char error[256];

        ASSERT_OK(parse(text, &req, error));
        return debug_request_fits(&req, role);
}

TEST(fits_roles)
{
        ASSERT_TRUE(fits("checkpoint web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(fits("checkpoint web extra", DEBUG_ROLE_PRIMARY)); /* as it always was */
        ASSERT_TRUE(!fits("checkpoint web", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(!fits("checkpoint web", DEBUG_ROLE_FAILED));
        ASSERT_TRUE(fits("hash web /h", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(fits("hash web /h", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(!fits("hash web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("hash web /h /x", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(fits("dump web /r /s", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(!fits("dump web /r /s", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(fits("image web /d", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(fits("image web /d /p", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("image web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("image web /d", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(fits("reset-pauses web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("reset-pauses web x", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(fits("resume web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(fits("promote web", DEBUG_ROLE_FAILED));
        ASSERT_TRUE(fits("promote web force", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(!fits("promote web please", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(!fits("promote web force now", DEBUG_ROLE_STANDBY));
        ASSERT_TRUE(fits("demote web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("demote web now", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("nonsense web", DEBUG_ROLE_PRIMARY));
        ASSERT_TRUE(!fits("status web", DEBUG_ROLE_PRIMARY));
}

TEST(framing)
{
        DebugLine l = {};
        char *line = NULL, *tail;
        size_t room;

        tail = debug_line_tail(&l, &room);
        ASSERT_EQ(room, DEBUG_LINE_MAX - 1);
        memcpy(tail, "stat", 4);
        ASSERT_EQ(debug_line_add(&l, 4, &line), 0);
        tail = debug_line_tail(&l, &room);
        memcpy(tail, "us\nrest", 7);
        ASSERT_EQ(debug_line_add(&l, 7, &line), 1);
        ASSERT_TRUE(streq(line, "status"));

        l = (DebugLine){};
        tail = debug_line_tail(&l, &room);
        memset(tail, 'a', room);
        ASSERT_EQ(debug_line_add(&l, room, &line), -E2BIG);
}

TEST(status_json)
{
        ReplStatus st = {.role = "standby",
                         .state = NULL,
                         .link_up = true,
                         .last_committed = UINT64_MAX,
                         .dirty_pages_per_s = 12.25,
                         .compression_ratio = NAN};
        _cleanup_free_ char *out = NULL;
        json_object *o, *v;

        snprintf(st.detail, sizeof(st.detail), "quote \" backslash \\ newline \n tab \t bell \x07 /path");
        snprintf(st.peer, sizeof(st.peer), "[::1]:7000");
        st.commit_gaps[0] = 3;
        ASSERT_OK(debug_status_json("web", &st, &out));
        ASSERT_TRUE(out[strlen(out) - 1] == '\n' && !memchr(out, '\n', strlen(out) - 1));
        /* The field order and spelling the tests and benchmarks read. */
        ASSERT_TRUE(strncmp(out, "{ \"vm\": \"web\", \"role\": \"standby\", \"state\": \"?\", \"detail\": ",
                            57) == 0);
        ASSERT_TRUE(strstr(out, "\"dirty_pages_per_s\": 12.2") != NULL); /* "%.1f" */
        ASSERT_TRUE(strstr(out, "\"compression_ratio\": null") != NULL); /* not "nan" */
        ASSERT_TRUE(strstr(out, "\"last_committed\": 18446744073709551615") != NULL);
        ASSERT_TRUE(strstr(out, "\"commit_gaps\": [ 3, 0, 0, 0, 0, 0, 0, 0 ]") != NULL);

        o = json_tokener_parse(out);
        ASSERT_TRUE(o != NULL);
        ASSERT_TRUE(json_object_object_get_ex(o, "detail", &v));
        ASSERT_TRUE(streq(json_object_get_string(v), st.detail));
        ASSERT_TRUE(json_object_object_get_ex(o, "link_up", &v) && json_object_get_boolean(v));
        json_object_put(o);
}

DEFINE_TEST_MAIN
