# Upstream test-case data for scanner/core/felix_params.py, as plain Python data.
#
# Carried over from:
#   projectcalico/calico @ 87c15906f20c4ca1fda55af92295e7678b0cc0b2 (master):
#     felix/config/config_params_test.go, felix/config/param_types_test.go,
#     felix/config/file_loader_test.go, felix/config/env_var_loader_test.go,
#     felix/config/testdata/{mainline,malformed,empty}.cfg
#     (struct tags from felix/config/config_params.go at the same commit)
#   go-ini/ini @ v1.67.0 = b2f570e5b5b844226bbefe6fb521d891f529a951:
#     parser_test.go, ini_test.go, file_test.go, key_test.go, section_test.go,
#     testdata/{full,minimal,UTF-8-BOM,UTF-16-LE-BOM}.ini,
#     testdata/TestFile_WriteTo.golden
# Copyright Tigera, Inc. / go-ini authors, Apache License 2.0; case data carried over.
#
# Every Entry/It of the four calico test files is either carried over below or
# listed in SKIPPED with the reason; UPSTREAM_TOTALS holds the per-file counts.
# For go-ini only the tests that load with the default LoadOptions (what
# ini.Load(data) in felix/config/file_loader.go uses) are in scope; the ones in
# scope that cannot be carried over are in SKIPPED too.
"""Upstream case data for the Felix parameter and config-file port."""

CALICO_COMMIT = "87c15906f20c4ca1fda55af92295e7678b0cc0b2"
GO_INI_COMMIT = "b2f570e5b5b844226bbefe6fb521d891f529a951"  # tag v1.67.0

CONFIG_PARAMS_TEST = "felix/config/config_params_test.go"
PARAM_TYPES_TEST = "felix/config/param_types_test.go"
FILE_LOADER_TEST = "felix/config/file_loader_test.go"
ENV_VAR_LOADER_TEST = "felix/config/env_var_loader_test.go"

# Entry(...) plus It(...) blocks per calico test file at CALICO_COMMIT.
UPSTREAM_TOTALS = {
    CONFIG_PARAMS_TEST: 208,
    PARAM_TYPES_TEST: 34,
    FILE_LOADER_TEST: 9,
    ENV_VAR_LOADER_TEST: 3,
}

MIN_INT = -9223372036854775808  # Go math.MinInt (64-bit)
MAX_INT = 9223372036854775807  # Go math.MaxInt (64-bit)

# ---------------------------------------------------------------------------
# config_params_test.go: one value through UpdateFrom/resolve for a field whose
# kind this port models.  "tag" is the field's struct tag in config_params.go;
# "expected" is the field value upstream asserts; "error_expected" is upstream's
# errorExpected (UpdateFrom failed: a non-zero field set to none).  "valid" is
# not asserted upstream: it is whether Parse accepted the value (False where the
# value was replaced by the default), the second element the port returns.
# ---------------------------------------------------------------------------
PARAM_CASES = [
    {
        "block": "Config parsing",
        "line": 263,
        "entry": "EtcdScheme",
        "field": "EtcdScheme",
        "tag": "oneof(http,https);http;local",
        "raw": "https",
        "expected": "https",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 277,
        "entry": "TyphaK8sServiceName set",
        "field": "TyphaK8sServiceName",
        "tag": "string;;local",
        "raw": "calico-typha",
        "expected": "calico-typha",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 279,
        "entry": "TyphaK8sNamespace set",
        "field": "TyphaK8sNamespace",
        "tag": "string;kube-system;non-zero,local",
        "raw": "default",
        "expected": "default",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 280,
        "entry": "TyphaK8sNamespace none",
        "field": "TyphaK8sNamespace",
        "tag": "string;kube-system;non-zero,local",
        "raw": "none",
        "expected": "kube-system",
        "error_expected": True,
        "valid": False,
    },
    {
        "block": "Config parsing",
        "line": 314,
        "entry": "ChainInsertMode append",
        "field": "ChainInsertMode",
        "tag": "oneof(insert,append);insert;non-zero,die-on-fail",
        "raw": "append",
        "expected": "append",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 315,
        "entry": "ChainInsertMode append",
        "field": "ChainInsertMode",
        "tag": "oneof(insert,append);insert;non-zero,die-on-fail",
        "raw": "Append",
        "expected": "append",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 324,
        "entry": "DefaultEndpointToHostAction",
        "field": "DefaultEndpointToHostAction",
        "tag": "oneof(DROP,RETURN,ACCEPT);DROP;non-zero,die-on-fail",
        "raw": "RETURN",
        "expected": "RETURN",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 326,
        "entry": "DefaultEndpointToHostAction",
        "field": "DefaultEndpointToHostAction",
        "tag": "oneof(DROP,RETURN,ACCEPT);DROP;non-zero,die-on-fail",
        "raw": "ACCEPT",
        "expected": "ACCEPT",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 329,
        "entry": "IptablesFilterAllowAction",
        "field": "IptablesFilterAllowAction",
        "tag": "oneof(ACCEPT,RETURN);ACCEPT;non-zero,die-on-fail",
        "raw": "RETURN",
        "expected": "RETURN",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 331,
        "entry": "IptablesMangleAllowAction",
        "field": "IptablesMangleAllowAction",
        "tag": "oneof(ACCEPT,RETURN);ACCEPT;non-zero,die-on-fail",
        "raw": "RETURN",
        "expected": "RETURN",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 334,
        "entry": "IptablesFilterDenyAction",
        "field": "IptablesFilterDenyAction",
        "tag": "oneof(DROP,REJECT);DROP;non-zero,die-on-fail",
        "raw": "DROP",
        "expected": "DROP",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 335,
        "entry": "IptablesFilterDenyAction",
        "field": "IptablesFilterDenyAction",
        "tag": "oneof(DROP,REJECT);DROP;non-zero,die-on-fail",
        "raw": "REJECT",
        "expected": "REJECT",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 339,
        "entry": "LogSeverityFile",
        "field": "LogSeverityFile",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "debug",
        "expected": "DEBUG",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 340,
        "entry": "LogSeverityFile",
        "field": "LogSeverityFile",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "warning",
        "expected": "WARNING",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 341,
        "entry": "LogSeverityFile",
        "field": "LogSeverityFile",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "error",
        "expected": "ERROR",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 342,
        "entry": "LogSeverityFile",
        "field": "LogSeverityFile",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "fatal",
        "expected": "FATAL",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 344,
        "entry": "LogSeverityScreen",
        "field": "LogSeverityScreen",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "debug",
        "expected": "DEBUG",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 345,
        "entry": "LogSeverityScreen",
        "field": "LogSeverityScreen",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "warning",
        "expected": "WARNING",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 346,
        "entry": "LogSeverityScreen",
        "field": "LogSeverityScreen",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "error",
        "expected": "ERROR",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 347,
        "entry": "LogSeverityScreen",
        "field": "LogSeverityScreen",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "fatal",
        "expected": "FATAL",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 349,
        "entry": "LogSeveritySys",
        "field": "LogSeveritySys",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "debug",
        "expected": "DEBUG",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 350,
        "entry": "LogSeveritySys",
        "field": "LogSeveritySys",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "warning",
        "expected": "WARNING",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 351,
        "entry": "LogSeveritySys",
        "field": "LogSeveritySys",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "error",
        "expected": "ERROR",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 352,
        "entry": "LogSeveritySys",
        "field": "LogSeveritySys",
        "tag": "oneof(TRACE,DEBUG,INFO,WARNING,ERROR,FATAL);INFO",
        "raw": "fatal",
        "expected": "FATAL",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 357,
        "entry": "IpInIpEnabled",
        "field": "IpInIpEnabled",
        "tag": "*bool;",
        "raw": "true",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 358,
        "entry": "IpInIpEnabled",
        "field": "IpInIpEnabled",
        "tag": "*bool;",
        "raw": "y",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 359,
        "entry": "IpInIpEnabled",
        "field": "IpInIpEnabled",
        "tag": "*bool;",
        "raw": "True",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 361,
        "entry": "IpInIpMtu",
        "field": "IpInIpMtu",
        "tag": "int;0",
        "raw": "1234",
        "expected": 1234,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 368,
        "entry": "EndpointReportingEnabled",
        "field": "EndpointReportingEnabled",
        "tag": "bool;false",
        "raw": "true",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 370,
        "entry": "EndpointReportingEnabled",
        "field": "EndpointReportingEnabled",
        "tag": "bool;false",
        "raw": "yes",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 375,
        "entry": "MaxIpsetSize",
        "field": "MaxIpsetSize",
        "tag": "int;1048576;non-zero",
        "raw": "12345",
        "expected": 12345,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 378,
        "entry": "HealthEnabled",
        "field": "HealthEnabled",
        "tag": "bool;false",
        "raw": "true",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 379,
        "entry": "HealthHost",
        "field": "HealthHost",
        "tag": "host-address;localhost",
        "raw": "127.0.0.1",
        "expected": "127.0.0.1",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 380,
        "entry": "HealthPort",
        "field": "HealthPort",
        "tag": "int(0:65535);9099",
        "raw": "1234",
        "expected": 1234,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 382,
        "entry": "PrometheusMetricsEnabled",
        "field": "PrometheusMetricsEnabled",
        "tag": "bool;false",
        "raw": "true",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 383,
        "entry": "PrometheusMetricsHost",
        "field": "PrometheusMetricsHost",
        "tag": "host-address;",
        "raw": "10.0.0.1",
        "expected": "10.0.0.1",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 384,
        "entry": "PrometheusMetricsPort",
        "field": "PrometheusMetricsPort",
        "tag": "int(0:65535);9091",
        "raw": "1234",
        "expected": 1234,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 385,
        "entry": "PrometheusGoMetricsEnabled",
        "field": "PrometheusGoMetricsEnabled",
        "tag": "bool;true",
        "raw": "false",
        "expected": False,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 386,
        "entry": "PrometheusProcessMetricsEnabled",
        "field": "PrometheusProcessMetricsEnabled",
        "tag": "bool;true",
        "raw": "false",
        "expected": False,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 512,
        "entry": "GoMaxProcs -2 should be replaced with default",
        "field": "GoMaxProcs",
        "tag": "int(-1);-1",
        "raw": "-2",
        "expected": -1,
        "error_expected": False,
        "valid": False,
    },
    {
        "block": "Config parsing",
        "line": 513,
        "entry": "GoMaxProcs 1000 valid",
        "field": "GoMaxProcs",
        "tag": "int(-1);-1",
        "raw": "1000",
        "expected": 1000,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 548,
        "entry": "RequireMTUFile valid",
        "field": "RequireMTUFile",
        "tag": "bool;false",
        "raw": "true",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 549,
        "entry": "RequireMTUFile valid",
        "field": "RequireMTUFile",
        "tag": "bool;false",
        "raw": "y",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config parsing",
        "line": 550,
        "entry": "RequireMTUFile valid",
        "field": "RequireMTUFile",
        "tag": "bool;false",
        "raw": "True",
        "expected": True,
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "Config override empty",
        "line": 205,
        "entry": "should allow IptablesBackend value 'Auto' read from FelixConfiguration resource",
        "field": "IptablesBackend",
        "tag": "oneof(legacy,nft,auto);auto",
        "raw": "Auto",
        "expected": "auto",
        "error_expected": False,
        "valid": True,
    },
    {
        "block": "ProgramClusterRoutes",
        "line": 1031,
        "entry": "falls back to the default if the value is not recognised",
        "field": "ProgramClusterRoutes",
        "tag": "oneof(Enabled,Disabled,EnabledIPIPOnly,EnabledNoEncapOnly);EnabledIPIPOnly",
        "raw": "NotAValue",
        "expected": "EnabledIPIPOnly",
        "error_expected": False,
        "valid": False,
    },
]

# Defaults derived from a tag (loadParams parses the tag's default string).
DEFAULT_CASES = [
    {
        "block": "Config override empty",
        "line": 201,
        "entry": "should have correct initial IptablesBackend value 'auto'",
        "field": "IptablesBackend",
        "tag": "oneof(legacy,nft,auto);auto",
        "expected": "auto",
    },
    {
        "block": "ProgramClusterRoutes",
        "line": 1008,
        "entry": "defaults to Felix owning the IPIP cluster routes and BIRD owning the rest",
        "field": "ProgramClusterRoutes",
        "tag": "oneof(Enabled,Disabled,EnabledIPIPOnly,EnabledNoEncapOnly);EnabledIPIPOnly",
        "expected": "EnabledIPIPOnly",
    },
]

# ProgramClusterRoutes (oneof): upstream asserts the derived accessors
# ProgramIPIPClusterRoutes() (value is Enabled or EnabledIPIPOnly) and
# ProgramNoEncapClusterRoutes() (value is Enabled or EnabledNoEncapOnly).
PROGRAM_CLUSTER_ROUTES_TAG = (
    "oneof(Enabled,Disabled,EnabledIPIPOnly,EnabledNoEncapOnly);EnabledIPIPOnly"
)
PROGRAM_CLUSTER_ROUTES_CASES = [
    # (line, entry, raw, expected_ipip, expected_noencap)
    (1023, "Disabled", "Disabled", False, False),
    (1024, "EnabledIPIPOnly", "EnabledIPIPOnly", True, False),
    (1025, "EnabledNoEncapOnly", "EnabledNoEncapOnly", False, True),
    (1026, "Enabled", "Enabled", True, True),
    (1028, "enabledipiponly", "enabledipiponly", True, False),
]

# "OpenStack heuristic tests", the MetadataPort rows: upstream asserts
# OpenstackActive(), whose port clause is MetadataPort != 0 && != 8775.
METADATA_PORT_TAG = "int(0:65535);8775;die-on-fail"
METADATA_PORT_CASES = [
    # (line, entry, raw, expected_openstack_active)
    (584, "metadataPort set", "1234", True),
    (585, "metadataPort = none", "none", False),
]

# "ParamForField": how an int tag becomes ranges, default string and flags.
PARAM_FOR_FIELD_CASES = [
    # (line, entry, field, tag, ranges, default_str, flags)
    (951, "int(0);1024", "TestField", "int(0);1024", [(0, MAX_INT)], "1024", ""),
    (
        961,
        "int(1:2147483646);512",
        "TestField6",
        "int(1:2147483646);512",
        [(1, 2147483646)],
        "512",
        "",
    ),
    (
        971,
        "defaults a mis-parsed max to MaxInt, not MinInt",
        "TestField",
        "int(0:);1024",
        [(0, MAX_INT)],
        "1024",
        "",
    ),
    (
        981,
        "does not copy min and max across comma-separated ranges",
        "TestField",
        "int(10:22,15:,:63);1024",
        [(10, 22), (15, MAX_INT), (MIN_INT, 63)],
        "1024",
        "",
    ),
    (
        995,
        "handles int with no params",
        "TestField",
        "int();1024",
        [(MIN_INT, MAX_INT)],
        "1024",
        "",
    ),
]

# ---------------------------------------------------------------------------
# file_loader_test.go: LoadConfigFileData on the text; "expected" is the whole
# map upstream asserts (None with "error": True where Load must fail).
# ---------------------------------------------------------------------------
MAINLINE_CFG = (
    "[ignored]\nFelixHostname=hostname\n[logging]\nLogSeverityScreen=INFO\nLogSeveritySys=DEBUG\n"
)
MALFORMED_CFG = "[foobar\n"
EMPTY_CFG = ""

FILE_LOADER_CASES = [
    {
        "block": "File parameter parsing",
        "line": 49,
        "entry": "Empty",
        "text": "",
        "expected": {},
        "error": False,
    },
    {
        "block": "File parameter parsing",
        "line": 50,
        "entry": "Single param",
        "text": ("[ignored]\nFelixHostname=hostname"),
        "expected": {"FelixHostname": "hostname"},
        "error": False,
    },
    {
        "block": "File parameter parsing",
        "line": 53,
        "entry": "Default block",
        "text": ("[default]\nFelixHostname=hostname"),
        "expected": {"FelixHostname": "hostname"},
        "error": False,
    },
    {
        "block": "File parameter parsing",
        "line": 56,
        "entry": "Multi block",
        "text": (
            "[ignored]\n"
            "FelixHostname=hostname\n"
            "[logging]\n"
            "LogSeverityScreen=INFO\n"
            "LogSeveritySys=DEBUG"
        ),
        "expected": {
            "FelixHostname": "hostname",
            "LogSeverityScreen": "INFO",
            "LogSeveritySys": "DEBUG",
        },
        "error": False,
    },
    {
        "block": "File parameter parsing",
        "line": 61,
        "entry": "Setting 'none' value",
        "text": ("[default]\nEndpointStatusPathPrefix=none\n"),
        "expected": {"EndpointStatusPathPrefix": "none"},
        "error": False,
    },
    {
        "block": "File load tests",
        "line": 79,
        "entry": "Empty",
        "text": EMPTY_CFG,
        "expected": {},
        "error": False,
    },
    {
        "block": "File load tests",
        "line": 80,
        "entry": "Mainline",
        "text": MAINLINE_CFG,
        "expected": {
            "FelixHostname": "hostname",
            "LogSeverityScreen": "INFO",
            "LogSeveritySys": "DEBUG",
        },
        "error": False,
    },
    {
        "block": "File load tests",
        "line": 85,
        "entry": "Malformed",
        "text": MALFORMED_CFG,
        "expected": None,
        "error": True,
    },
]

# ---------------------------------------------------------------------------
# go-ini/ini (default LoadOptions).  "items" are the key -> value pairs upstream
# asserts (as the merged map LoadConfigFileData builds; Felix uses
# key.Value(), which equals the String() upstream asserts for every value
# here); "absent" are keys upstream asserts empty; "exact" means "items" is the
# whole map; "error" is True (Load fails), an exact message, or None.
# ---------------------------------------------------------------------------

# testdata/minimal.ini
MINIMAL_INI = "[author]\nE-MAIL = u@gogs.io"

# testdata/full.ini
FULL_INI = (
    "; Package name\n"
    "NAME        = ini\n"
    "; Package version\n"
    "VERSION     = v1\n"
    "; Package import path\n"
    "IMPORT_PATH = gopkg.in/%(NAME)s.%(VERSION)s\n"
    "\n"
    "# Information about package author\n"
    "# Bio can be written in multiple lines.\n"
    "[author]\n"
    "NAME   = Unknwon\n"
    "E-MAIL = u@gogs.io\n"
    "GITHUB = https://github.com/%(NAME)s\n"
    'BIO    = """Gopher.\n'
    "Coding addict.\n"
    "Good man.\n"
    '"""  # Succeeding comment\n'
    "\n"
    "[package]\n"
    "CLONE_URL = https://%(IMPORT_PATH)s\n"
    "\n"
    "[package.sub]\n"
    "UNUSED_KEY = should be deleted\n"
    "\n"
    "[features]\n"
    "-: Support read/write comments of keys and sections\n"
    "-: Support auto-increment of key names\n"
    "-: Support load multiple files to overwrite key values\n"
    "\n"
    "[types]\n"
    "STRING     = str\n"
    "BOOL       = true\n"
    "BOOL_FALSE = false\n"
    "FLOAT64    = 1.25\n"
    "INT        = 10\n"
    "TIME       = 2015-01-01T20:17:05Z\n"
    "DURATION   = 2h45m\n"
    "UINT       = 3\n"
    "HEX_NUMBER = 0x3000\n"
    "\n"
    "[array]\n"
    "STRINGS  = en, zh, de\n"
    "FLOAT64S = 1.1, 2.2, 3.3\n"
    "INTS     = 1, 2, 3\n"
    "UINTS    = 1, 2, 3\n"
    "TIMES    = 2015-01-01T20:17:05Z,2015-01-01T20:17:05Z,2015-01-01T20:17:05Z\n"
    "BOOLS    = true, false, false\n"
    "\n"
    "[note]\n"
    "empty_lines = next line is empty\\\n"
    "\n"
    "; Comment before the section\n"
    "[comments] ; This is a comment for the section too\n"
    "; Comment before key\n"
    'key  = "value"\n'
    'key2 = "value2" ; This is a comment for key2\n'
    'key3 = "one", "two", "three"\n'
    "\n"
    "[string escapes]\n"
    "key1 = value1, value2, value3\n"
    "key2 = value1\\, value2\n"
    "key3 = val\\ue1, value2\n"
    "key4 = value1\\\\, value\\\\\\\\2\n"
    "key5 = value1\\,, value2\n"
    "key6 = aaa bbb\\ and\\ space ccc\n"
    "\n"
    "[advance]\n"
    'value with quotes      = "some value"\n'
    "value quote2 again     = 'some value'\n"
    "includes comment sign  = `my#password`\n"
    "includes comment sign2 = `my;password`\n"
    "true                   = 2+3=5\n"
    '"1+1=2"                = true\n'
    '"""6+1=7"""            = true\n'
    '"""`5+5`"""            = 10\n'
    '`"6+6"`                = 12\n'
    "`7-2=4`                = false\n"
    "ADDRESS                = `404 road,\n"
    "NotFound, State, 50000`\n"
    "two_lines = how about \\\n"
    "\tcontinuation lines?\n"
    "lots_of_lines = 1 \\\n"
    "\t2 \\\n"
    "\t3 \\\n"
    "\t4 \\\n"
)

# testdata/full.ini merged as LoadConfigFileData merges it.  Values: the
# TestFile_WriteTo golden file (testdata/TestFile_WriteTo.golden, which writes
# every key of the loaded full.ini back out, with WriteTo's quoting: `...` for
# values with # or ;, """...""" for multi-line ones, "..." for ones with
# outer spaces, `...` or """...""" around keys with = : or `), minus the two
# keys that test adds to [note]; section order (which decides overwrites): the
# names TestFile_Sections asserts, DEFAULT, author, package, package.sub,
# features, types, array, note, comments, string escapes, advance (so NAME is
# [author]'s and key2/key3 are [string escapes]').
FULL_INI_EXPECTED = {
    "NAME": "Unknwon",
    "VERSION": "v1",
    "IMPORT_PATH": "gopkg.in/%(NAME)s.%(VERSION)s",
    "E-MAIL": "u@gogs.io",
    "GITHUB": "https://github.com/%(NAME)s",
    "BIO": "Gopher.\nCoding addict.\nGood man.\n",
    "CLONE_URL": "https://%(IMPORT_PATH)s",
    "UNUSED_KEY": "should be deleted",
    "#1": "Support read/write comments of keys and sections",
    "#2": "Support auto-increment of key names",
    "#3": "Support load multiple files to overwrite key values",
    "STRING": "str",
    "BOOL": "true",
    "BOOL_FALSE": "false",
    "FLOAT64": "1.25",
    "INT": "10",
    "TIME": "2015-01-01T20:17:05Z",
    "DURATION": "2h45m",
    "UINT": "3",
    "HEX_NUMBER": "0x3000",
    "STRINGS": "en, zh, de",
    "FLOAT64S": "1.1, 2.2, 3.3",
    "INTS": "1, 2, 3",
    "UINTS": "1, 2, 3",
    "TIMES": "2015-01-01T20:17:05Z,2015-01-01T20:17:05Z,2015-01-01T20:17:05Z",
    "BOOLS": "true, false, false",
    "empty_lines": "next line is empty",
    "key": "value",
    "key1": "value1, value2, value3",
    "key2": "value1\\, value2",
    "key3": "val\\ue1, value2",
    "key4": "value1\\\\, value\\\\\\\\2",
    "key5": "value1\\,, value2",
    "key6": "aaa bbb\\ and\\ space ccc",
    "value with quotes": "some value",
    "value quote2 again": "some value",
    "includes comment sign": "my#password",
    "includes comment sign2": "my;password",
    "true": "2+3=5",
    "1+1=2": "true",
    "6+1=7": "true",
    "`5+5`": "10",
    '"6+6"': "12",
    "7-2=4": "false",
    "ADDRESS": "404 road,\nNotFound, State, 50000",
    "two_lines": "how about continuation lines?",
    "lots_of_lines": "1 2 3 4 ",
}

INI_CASES = [
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBOM/test handling BOM/UTF-8-BOM",
        "data": b"\xef\xbb\xbf[author]\nE-MAIL = example@email.com",
        "items": {"E-MAIL": "example@email.com"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBOM/test handling BOM/UTF-16-LE-BOM",
        "data": (
            b"\xff\xfe[\x00a\x00u\x00t\x00h\x00o\x00r\x00"
            b"]\x00\n\x00E\x00-\x00M\x00A\x00I\x00L\x00"
            b" \x00=\x00 \x00e\x00x\x00a\x00m\x00p\x00"
            b"l\x00e\x00@\x00e\x00m\x00a\x00i\x00l\x00"
            b".\x00c\x00o\x00m\x00"
        ),
        "items": {},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad section name #1",
        "text": "[]",
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad section name #2",
        "text": "[",
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad keys #1",
        "text": '"""name',
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad keys #2",
        "text": '"""name"""',
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad keys #3",
        "text": '""=1',
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad keys #4",
        "text": "=",
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad keys #5",
        "text": "name",
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "parser_test.go",
        "line": None,
        "test": "TestBadLoad/load with bad data/bad values",
        "text": 'name="""Unknwon',
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "ini_test.go",
        "line": 90,
        "test": ("TestLoad/cannot properly parse INI files containing `#` or `;` in value"),
        "text": ("\n\t[author]\n\tNAME = U#n#k#n#w#o#n\n\tGITHUB = U;n;k;n;w;o;n\n\t"),
        "items": {"NAME": "U", "GITHUB": "U"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 106,
        "test": "TestLoad/cannot parse small python-compatible INI files",
        "text": (
            "\n"
            "[long]\n"
            "long_rsa_private_key = -----BEGIN RSA PRIVATE KEY-----\n"
            "   foo\n"
            "   bar\n"
            "   foobar\n"
            "   barfoo\n"
            "   -----END RSA PRIVATE KEY-----\n"
        ),
        "items": {},
        "absent": [],
        "exact": False,
        "error": "key-value delimiter not found: foo\n",
    },
    {
        "file": "ini_test.go",
        "line": 121,
        "test": "TestLoad/cannot parse big python-compatible INI files",
        "text": (
            "\n"
            "[long]\n"
            "long_rsa_private_key = -----BEGIN RSA PRIVATE KEY-----\n"
            "   1foo\n"
            "   2bar\n"
            "   3foobar\n"
            "   4barfoo\n"
            "   5foo\n"
            "   6bar\n"
            "   7foobar\n"
            "   8barfoo\n"
            "   9foo\n"
            "   10bar\n"
            "   11foobar\n"
            "   12barfoo\n"
            "   13foo\n"
            "   14bar\n"
            "   15foobar\n"
            "   16barfoo\n"
            "   17foo\n"
            "   18bar\n"
            "   19foobar\n"
            "   20barfoo\n"
            "   21foo\n"
            "   22bar\n"
            "   23foobar\n"
            "   24barfoo\n"
            "   25foo\n"
            "   26bar\n"
            "   27foobar\n"
            "   28barfoo\n"
            "   29foo\n"
            "   30bar\n"
            "   31foobar\n"
            "   32barfoo\n"
            "   33foo\n"
            "   34bar\n"
            "   35foobar\n"
            "   36barfoo\n"
            "   37foo\n"
            "   38bar\n"
            "   39foobar\n"
            "   40barfoo\n"
            "   41foo\n"
            "   42bar\n"
            "   43foobar\n"
            "   44barfoo\n"
            "   45foo\n"
            "   46bar\n"
            "   47foobar\n"
            "   48barfoo\n"
            "   49foo\n"
            "   50bar\n"
            "   51foobar\n"
            "   52barfoo\n"
            "   53foo\n"
            "   54bar\n"
            "   55foobar\n"
            "   56barfoo\n"
            "   57foo\n"
            "   58bar\n"
            "   59foobar\n"
            "   60barfoo\n"
            "   61foo\n"
            "   62bar\n"
            "   63foobar\n"
            "   64barfoo\n"
            "   65foo\n"
            "   66bar\n"
            "   67foobar\n"
            "   68barfoo\n"
            "   69foo\n"
            "   70bar\n"
            "   71foobar\n"
            "   72barfoo\n"
            "   73foo\n"
            "   74bar\n"
            "   75foobar\n"
            "   76barfoo\n"
            "   77foo\n"
            "   78bar\n"
            "   79foobar\n"
            "   80barfoo\n"
            "   81foo\n"
            "   82bar\n"
            "   83foobar\n"
            "   84barfoo\n"
            "   85foo\n"
            "   86bar\n"
            "   87foobar\n"
            "   88barfoo\n"
            "   89foo\n"
            "   90bar\n"
            "   91foobar\n"
            "   92barfoo\n"
            "   93foo\n"
            "   94bar\n"
            "   95foobar\n"
            "   96barfoo\n"
            "   -----END RSA PRIVATE KEY-----\n"
        ),
        "items": {},
        "absent": [],
        "exact": False,
        "error": "key-value delimiter not found: 1foo\n",
    },
    {
        "file": "ini_test.go",
        "line": 259,
        "test": ("TestInsensitiveLoad/insensitive to section and key names/inverse case"),
        "text": MINIMAL_INI,
        "items": {},
        "absent": ["e-mail"],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 340,
        "test": (
            "TestLoadSources/with true `AllowPythonMultilineValues`"
            "/insensitive to sections and sensitive to key names/in"
            "verse case"
        ),
        "text": MINIMAL_INI,
        "items": {},
        "absent": ["e-mail"],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 367,
        "test": (
            "TestLoadSources/with true `AllowPythonMultilineValues`"
            "/sensitive to sections and insensitive to key names/in"
            "verse case"
        ),
        "text": MINIMAL_INI,
        "items": {},
        "absent": ["e-mail"],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 944,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/insensitive to section and key names/inverse case"
        ),
        "text": MINIMAL_INI,
        "items": {},
        "absent": ["e-mail"],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 868,
        "test": (
            "TestLoadSources/with true `AllowPythonMultilineValues`"
            "/and false `SpaceBeforeInlineComment`/cannot parse INI"
            " files containing `#` or `;` in value (loads with Allo"
            "wPythonMultilineValues: false)"
        ),
        "text": ("\n[author]\nNAME = U#n#k#n#w#o#n\nGITHUB = U;n;k;n;w;o;n\n"),
        "items": {"NAME": "U", "GITHUB": "U"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 968,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/ignore continuation lines/inverse case"
        ),
        "text": ("\nkey1=a\\b\\\nkey2=c\\d\\"),
        "items": {"key1": "a\\bkey2=c\\d"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 994,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/ignore inline comments/inverse case"
        ),
        "text": ("\nkey1=value ;comment\nkey2=value2 #comment2"),
        "items": {"key1": "value", "key2": "value2"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 1034,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/allow boolean type keys/inverse case"
        ),
        "text": ("\nkey1=hello\n#key2\nkey3"),
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "ini_test.go",
        "line": 1076,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues`/allow shadow keys/inverse case"
        ),
        "text": (
            "\n"
            '[remote "origin"]\n'
            "url = https://github.com/Antergone/test1.git\n"
            "url = https://github.com/Antergone/test2.git"
        ),
        "items": {"url": "https://github.com/Antergone/test2.git"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 1099,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/unescape double quotes inside value/inverse case"
        ),
        "text": ('\ncreate_repo="创建了仓库 <a href=\\"%s\\">%s</a>"'),
        "items": {"create_repo": '"创建了仓库 <a href=\\"%s\\">%s</a>"'},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "ini_test.go",
        "line": 1123,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/cannot parse small python-compatible INI files"
        ),
        "text": (
            "\n"
            "[long]\n"
            "long_rsa_private_key = -----BEGIN RSA PRIVATE KEY-----\n"
            "  foo\n"
            "  bar\n"
            "  foobar\n"
            "  barfoo\n"
            "  -----END RSA PRIVATE KEY-----\n"
        ),
        "items": {},
        "absent": [],
        "exact": False,
        "error": "key-value delimiter not found: foo\n",
    },
    {
        "file": "ini_test.go",
        "line": 1138,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/cannot parse big python-compatible INI files"
        ),
        "text": (
            "\n"
            "[long]\n"
            "long_rsa_private_key = -----BEGIN RSA PRIVATE KEY-----\n"
            "  1foo\n"
            "  2bar\n"
            "  3foobar\n"
            "  4barfoo\n"
            "  5foo\n"
            "  6bar\n"
            "  7foobar\n"
            "  8barfoo\n"
            "  9foo\n"
            "  10bar\n"
            "  11foobar\n"
            "  12barfoo\n"
            "  13foo\n"
            "  14bar\n"
            "  15foobar\n"
            "  16barfoo\n"
            "  17foo\n"
            "  18bar\n"
            "  19foobar\n"
            "  20barfoo\n"
            "  21foo\n"
            "  22bar\n"
            "  23foobar\n"
            "  24barfoo\n"
            "  25foo\n"
            "  26bar\n"
            "  27foobar\n"
            "  28barfoo\n"
            "  29foo\n"
            "  30bar\n"
            "  31foobar\n"
            "  32barfoo\n"
            "  33foo\n"
            "  34bar\n"
            "  35foobar\n"
            "  36barfoo\n"
            "  37foo\n"
            "  38bar\n"
            "  39foobar\n"
            "  40barfoo\n"
            "  41foo\n"
            "  42bar\n"
            "  43foobar\n"
            "  44barfoo\n"
            "  45foo\n"
            "  46bar\n"
            "  47foobar\n"
            "  48barfoo\n"
            "  49foo\n"
            "  50bar\n"
            "  51foobar\n"
            "  52barfoo\n"
            "  53foo\n"
            "  54bar\n"
            "  55foobar\n"
            "  56barfoo\n"
            "  57foo\n"
            "  58bar\n"
            "  59foobar\n"
            "  60barfoo\n"
            "  61foo\n"
            "  62bar\n"
            "  63foobar\n"
            "  64barfoo\n"
            "  65foo\n"
            "  66bar\n"
            "  67foobar\n"
            "  68barfoo\n"
            "  69foo\n"
            "  70bar\n"
            "  71foobar\n"
            "  72barfoo\n"
            "  73foo\n"
            "  74bar\n"
            "  75foobar\n"
            "  76barfoo\n"
            "  77foo\n"
            "  78bar\n"
            "  79foobar\n"
            "  80barfoo\n"
            "  81foo\n"
            "  82bar\n"
            "  83foobar\n"
            "  84barfoo\n"
            "  85foo\n"
            "  86bar\n"
            "  87foobar\n"
            "  88barfoo\n"
            "  89foo\n"
            "  90bar\n"
            "  91foobar\n"
            "  92barfoo\n"
            "  93foo\n"
            "  94bar\n"
            "  95foobar\n"
            "  96barfoo\n"
            "  -----END RSA PRIVATE KEY-----\n"
        ),
        "items": {},
        "absent": [],
        "exact": False,
        "error": "key-value delimiter not found: 1foo\n",
    },
    {
        "file": "ini_test.go",
        "line": 1294,
        "test": (
            "TestLoadSources/with false `AllowPythonMultilineValues"
            "`/allow unparsable sections/inverse case"
        ),
        "text": (
            "\n"
            "[CORE_LESSON]\n"
            "my lesson state data – 1111111111111111111000000000000000001110000\n"
            "111111111111111111100000000000111000000000 – end my lesson state data"
        ),
        "items": {},
        "absent": [],
        "exact": False,
        "error": True,
    },
    {
        "file": "ini_test.go",
        "line": 1492,
        "test": ("Test_PreserveSurroundedQuote/preserve surrounded quote test inverse test"),
        "text": ('\n[section]\nkey1 = "value1"\nkey2 = value2\n'),
        "items": {"key1": "value1", "key2": "value2"},
        "absent": [],
        "exact": False,
        "error": None,
    },
    {
        "file": "file_test.go",
        "line": 282,
        "test": "TestFile_NewSection/get sections after deletion",
        "text": ("\n[RANDOM]\n"),
        "items": {},
        "absent": [],
        "exact": True,
        "error": None,
    },
    {
        "file": "file_test.go",
        "line": 322,
        "test": "TestFile_ChildSections",
        "text": ("\n[node]\n[node.biz1]\n[node.biz2]\n[node.biz3]\n[node.bizN]\n"),
        "items": {},
        "absent": [],
        "exact": True,
        "error": None,
    },
    {
        "file": "file_test.go",
        "line": 433,
        "test": "TestFile_WriteTo/support multiline comments",
        "text": (
            "\n# \n# general.domain\n# \n# Domain name of XX system.\ndomain      = mydomain.com\n"
        ),
        "items": {"domain": "mydomain.com"},
        "absent": [],
        "exact": True,
        "error": None,
    },
    {
        "file": "file_test.go",
        "line": 461,
        "test": "TestFile_WriteTo/keep leading and trailing spaces in value",
        "text": ('[foo]\nbar1 = \'  val ue1 \'\nbar2 = """  val ue2 """\nbar3 = "  val ue3 "\n'),
        "items": {
            "bar1": "  val ue1 ",
            "bar2": "  val ue2 ",
            "bar3": "  val ue3 ",
        },
        "absent": [],
        "exact": True,
        "error": None,
    },
    {
        "file": "file_test.go",
        "line": 491,
        "test": "TestFile_WriteToWithOutputDelimiter",
        "text": (
            "[Others]\n"
            "Cities = HangZhou|Boston\n"
            "Visits = 1993-10-07T20:17:05Z, 1993-10-07T20:17:05Z\n"
            "Years = 1993,1994\n"
            "Numbers = 10010,10086\n"
            "Ages = 18,19\n"
            "Populations = 12345678,98765432\n"
            "Coordinates = 192.168,10.11\n"
            "Flags       = true,false\n"
            "Note = Hello world!"
        ),
        "items": {
            "Cities": "HangZhou|Boston",
            "Visits": "1993-10-07T20:17:05Z, 1993-10-07T20:17:05Z",
            "Years": "1993,1994",
            "Numbers": "10010,10086",
            "Ages": "18,19",
            "Populations": "12345678,98765432",
            "Coordinates": "192.168,10.11",
            "Flags": "true,false",
            "Note": "Hello world!",
        },
        "absent": [],
        "exact": True,
        "error": None,
    },
    {
        "file": "file_test.go",
        "line": 408,
        "test": (
            "TestFile_WriteTo/write content to somewhere (+ TestFile_Sections for section order)"
        ),
        "text": FULL_INI,
        "items": FULL_INI_EXPECTED,
        "absent": [],
        "exact": True,
        "error": None,
    },
    {
        "file": "key_test.go",
        "line": 629,
        "test": "TestRecursiveValues/recursive value with no target found",
        "text": ("\n[foo]\nbar = %(missing)s\n"),
        "items": {"bar": "%(missing)s"},
        "absent": [],
        "exact": True,
        "error": None,
    },
]

# ---------------------------------------------------------------------------
# Upstream cases that cannot be carried over, with the reason.  For go-ini only
# the tests that load with default LoadOptions are in scope (tests of other
# options - Insensitive, AllowShadows, AllowBooleanKeys, AllowPythonMultiline-
# Values: true, ... - are out of scope and not listed).
# ---------------------------------------------------------------------------
SKIPPED = [
    {
        "file": "felix/config/config_params_test.go",
        "block": "FelixConfig vs ConfigParams parity",
        "reason": (
            "compares the Go struct fields of Config and FelixConfigurationSpec; no parsing"
        ),
        "entries": [
            (98, "FelixConfigurationSpec should contain all Config fields"),
            (116, "Config should contain all FelixConfigurationSpec fields"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config override empty",
        "reason": (
            "OverrideParam / source-priority across sources; the port resolves one value "
            "from one source"
        ),
        "entries": [
            (152, "should allow config override"),
            (165, "should allow config override"),
            (193, "should be overridable"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config override empty",
        "reason": (
            "EndpointStatusPathPrefix is a `file` param (FileParam); not ported (none -> "
            "zero value is covered by the PrometheusMetrics* none cases)"
        ),
        "entries": [
            (212, "should have correct default EndpointStatusPathPrefix value"),
            (223, "should have EndpointStatusPathPrefix empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "NetlinkTimeoutSecs is also a `seconds` param (SecondsParam), not ported"
        ),
        "entries": [
            (252, "Netlink Timeout - default value [NetlinkTimeoutSecs]"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "EndpointStatusPathPrefix is also a `file` param (FileParam), not ported"
        ),
        "entries": [
            (254, "EndpointStatusPathPrefix - default value"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`hostname` param (HostnameRegexp RegexpParam), a kind the PrometheusMetrics* "
            "params do not use; not ported"
        ),
        "entries": [
            (256, "FelixHostname"),
            (257, "FelixHostname FQDN"),
            (258, "FelixHostname as IP"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`authority` param (AuthorityRegexp RegexpParam), a kind the PrometheusMetrics* "
            "params do not use; not ported"
        ),
        "entries": [
            (260, "EtcdAddr IP"),
            (262, "EtcdAddr host"),
            (275, "TyphaAddr set"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); EtcdAddr is also "
            "a `authority` param (AuthorityRegexp RegexpParam), not ported"
        ),
        "entries": [
            (261, "EtcdAddr Empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`endpoint-list` param (EndpointListParam), a kind the PrometheusMetrics* "
            "params do not use; not ported"
        ),
        "entries": [
            (267, "EtcdEndpoints HTTP"),
            (270, "EtcdEndpoints HTTPS"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); TyphaAddr is also "
            "a `authority` param (AuthorityRegexp RegexpParam), not ported"
        ),
        "entries": [
            (274, "TyphaAddr empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test)"
        ),
        "entries": [
            (276, "TyphaK8sServiceName empty"),
            (278, "TyphaK8sNamespace empty"),
            (511, "GoMaxProcs default"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`iface-list` param (IfaceListRegexp RegexpParam), a kind the "
            "PrometheusMetrics* params do not use; not ported"
        ),
        "entries": [
            (282, "InterfacePrefix"),
            (283, "InterfacePrefix list"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`iface-list-regexp` param (RegexpPatternListParam), a kind the "
            "PrometheusMetrics* params do not use; not ported"
        ),
        "entries": [
            (285, "InterfaceExclude one value no regexp"),
            (288, "InterfaceExclude list no regexp"),
            (292, "InterfaceExclude one value regexp"),
            (295, "InterfaceExclude list regexp"),
            (300, "InterfaceExclude no regexp"),
            (304, "InterfaceExclude list empty regexp"),
            (307, "InterfaceExclude list bad comma use"),
            (310, "InterfaceExclude list invalid regexp symbol"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`seconds` param (SecondsParam), a kind the PrometheusMetrics* params do not "
            "use; not ported"
        ),
        "entries": [
            (317, "IptablesPostWriteCheckIntervalSecs"),
            (365, "ReportingIntervalSecs"),
            (366, "ReportingTTLSecs"),
            (372, "EndpointReportingDelaySecs"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`millis` param (MillisParam), a kind the PrometheusMetrics* params do not use; "
            "not ported"
        ),
        "entries": [
            (319, "IptablesLockProbeIntervalMillis"),
            (321, "IptablesLockProbeIntervalMillis garbage"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`file` param (FileParam), a kind the PrometheusMetrics* params do not use; not ported"
        ),
        "entries": [
            (337, "LogFilePath"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "LogDebugFilenameRegex is also a `regexp` param (RegexpPatternParam), not "
            "ported"
        ),
        "entries": [
            (354, "LogDebugFilenameRegex"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`regexp` param (RegexpPatternParam), a kind the PrometheusMetrics* params do "
            "not use; not ported"
        ),
        "entries": [
            (355, "LogDebugFilenameRegex"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`ipv4` param (Ipv4Param), a kind the PrometheusMetrics* params do not use; not ported"
        ),
        "entries": [
            (362, "IpInIpTunnelAddr"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`mark-bitmask` param (MarkBitmaskParam), a kind the PrometheusMetrics* params "
            "do not use; not ported"
        ),
        "entries": [
            (376, "IptablesMarkMask"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`port-list` param (PortListParam), a kind the PrometheusMetrics* params do not "
            "use; not ported"
        ),
        "entries": [
            (388, "FailsafeInboundHostPorts old syntax"),
            (395, "FailsafeOutboundHostPorts old syntax"),
            (402, "FailsafeInboundHostPorts new syntax"),
            (407, "FailsafeOutboundHostPorts new syntax"),
            (412, "FailsafeInboundHostPorts new cidr syntax"),
            (417, "FailsafeOutboundHostPorts new cidr syntax"),
            (422, "FailsafeInboundHostPorts new cidr syntax IPv6"),
            (427, "FailsafeOutboundHostPorts new cidr syntax IPv6"),
            (432, "FailsafeInboundHostPorts mixed syntax"),
            (437, "FailsafeOutboundHostPorts mixed syntax"),
            (442, "FailsafeInboundHostPorts new mixed syntax"),
            (447, "FailsafeOutboundHostPorts new mixed syntax"),
            (452, "FailsafeInboundHostPorts bad syntax -> defaulted"),
            (466, "FailsafeInboundHostPorts too many parts -> defaulted"),
            (481, "FailsafeInboundHostPorts none"),
            (482, "FailsafeOutboundHostPorts none"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "FailsafeInboundHostPorts is also a `port-list` param (PortListParam), not "
            "ported"
        ),
        "entries": [
            (484, "FailsafeInboundHostPorts empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "FailsafeOutboundHostPorts is also a `port-list` param (PortListParam), not "
            "ported"
        ),
        "entries": [
            (497, "FailsafeOutboundHostPorts empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "KubeNodePortRanges is also a `portrange-list` param (PortRangeListParam), not "
            "ported"
        ),
        "entries": [
            (515, "KubeNodePortRanges empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`portrange-list` param (PortRangeListParam), a kind the PrometheusMetrics* "
            "params do not use; not ported"
        ),
        "entries": [
            (520, "KubeNodePortRanges range"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`iface-param` param (IfaceParamRegexp RegexpParam), a kind the "
            "PrometheusMetrics* params do not use; not ported"
        ),
        "entries": [
            (528, "IptablesNATOutgoingInterfaceFilter"),
            (529, "IptablesNATOutgoingInterfaceFilter"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "HealthTimeoutOverrides is also a `keydurationlist` param "
            "(KeyDurationListParam), not ported"
        ),
        "entries": [
            (531, "HealthTimeoutOverrides"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`keydurationlist` param (KeyDurationListParam), a kind the PrometheusMetrics* "
            "params do not use; not ported"
        ),
        "entries": [
            (532, "HealthTimeoutOverrides good"),
            (533, "HealthTimeoutOverrides good x 2"),
            (535, "HealthTimeoutOverrides good zero"),
            (538, "HealthTimeoutOverrides non-duration"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "empty value: UpdateFrom drops it before parsing, so the default applies; "
            "parse_value requires non-empty raw (covered by an own test); "
            "BPFForceTrackPacketsFromIfaces is also a `iface-filter-slice` param "
            "(StringSliceParam), not ported"
        ),
        "entries": [
            (540, "BPFForceTrackPacketsFromIfaces Empty"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config parsing",
        "reason": (
            "`iface-filter-slice` param (StringSliceParam), a kind the PrometheusMetrics* "
            "params do not use; not ported"
        ),
        "entries": [
            (541, "BPFForceTrackPacketsFromIfaces Single valid entry"),
            (542, "BPFForceTrackPacketsFromIfaces Single valid entry"),
            (543, "BPFForceTrackPacketsFromIfaces Single valid wildcard"),
            (544, "BPFForceTrackPacketsFromIfaces Multiple valid entries"),
            (545, "BPFForceTrackPacketsFromIfaces Single invalid entry"),
            (546, "BPFForceTrackPacketsFromIfaces Multiple invalid entries"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "OpenStack heuristic tests",
        "reason": ("OpenstackActive() heuristics on ClusterType (set directly, not parsed)"),
        "entries": [
            (573, "no config"),
            (575, "explicit openstack as cluster type"),
            (576, "explicit openstack at start of cluster type"),
            (577, "explicit openstack at end of cluster type"),
            (578, "explicit openstack in middle of cluster type"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "OpenStack heuristic tests",
        "reason": ("MetadataAddr is a `hostname` param (HostnameRegexp RegexpParam); not ported"),
        "entries": [
            (580, "metadataAddr set"),
            (581, "metadataAddr = none"),
            (582, "metadataAddr = ''"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "OpenStack heuristic tests",
        "reason": (
            "InterfacePrefix is an `iface-list` param; OpenstackActive() heuristics; not ported"
        ),
        "entries": [
            (587, "ifacePrefixes = tap"),
            (588, "ifacePrefixes = cali,tap"),
            (589, "ifacePrefixes = tap,cali "),
            (590, "ifacePrefixes = cali "),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Kubernetes Provider tests",
        "reason": ("KubernetesProvider() derived from ClusterType (set directly, not parsed)"),
        "entries": [
            (599, "no config"),
            (601, "explicit provider as cluster type"),
            (602, "explicit provider at start of cluster type"),
            (603, "explicit provider at end of cluster type"),
            (604, "explicit provider in middle of cluster type"),
            (605, "no explicit provider in cluster type"),
            (607, "EKS provider"),
            (608, "GKE provider"),
            (609, "AKS provider"),
            (610, "OpenShift provider"),
            (611, "DockerEE provider"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "DatastoreConfig tests",
        "reason": ("DatastoreConfig() merging of libcalico API config; no parameter parsing"),
        "entries": [
            (624, "should leave node polling enabled"),
            (636, "should leave node polling enabled"),
            (658, "sets the configuration options"),
            (678, "sets the etcd suboptions"),
            (714, "sets the configuration to what the felix configuration is"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config validation",
        "reason": (
            "cross-field Validate() (Typha TLS) and `region`/`route-table-range(s)` kinds; "
            "not ported"
        ),
        "entries": [
            (741, "no settings"),
            (742, "just one TLS setting"),
            (745, "TLS certs and key but no CN or URI SAN"),
            (750, "TLS certs and key and CN but no URI SAN"),
            (756, "TLS certs and key and URI SAN but no CN"),
            (762, "all Felix-Typha TLS params"),
            (769, "valid OpenstackRegion"),
            (772, "OpenstackRegion with uppercase"),
            (775, "OpenstackRegion with slash"),
            (778, "OpenstackRegion with underscore"),
            (781, "OpenstackRegion too long"),
            (784, "valid RouteTableRange"),
            (787, "invalid RouteTableRange"),
            (790, "valid RouteTableRanges"),
            (794, "overflowing RouteTableRanges"),
            (798, "excessive RouteTableRanges"),
            (801, "excessive RouteTableRanges off-by-one"),
            (804, "RouteTableRanges 32-bit wrap-around"),
            (807, "invalid RouteTableRanges"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config InterfaceExclude",
        "reason": ("`iface-list-regexp` param (RegexpPatternListParam); not ported"),
        "entries": [
            (821, "empty exclude list"),
            (824, "non-regexp single value"),
            (827, "non-regexp multiple values"),
            (831, "regexp single value"),
            (834, "regexp multiple values"),
            (838, "both non-regexp and regexp values"),
            (843, "invalid non-regexp value"),
            (846, "invalid regexp value"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Config copy tests",
        "reason": ("Config.Copy()/protobuf round trip; no parsing"),
        "entries": [
            (871, "should copy correctly"),
            (875, "should copy via protobuf correctly UpdateFromConfigUpdate"),
            (892, "should copy via protobuf correctly FromConfigUpdate"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "SafeParamsEqual",
        "reason": ("SafeParamsEqual compares parsed values (regexps, IPs); not part of parsing"),
        "entries": [
            (909, "empty"),
            (910, "different strings"),
            (911, "same regexps"),
            (912, "different regexps"),
            (913, "same []regexps"),
            (918, "different []regexps"),
            (923, "different length []regexps"),
            (928, "nil IPs"),
            (933, "same IPs"),
            (938, "equivalent IPs"),
            (943, "different IPs"),
        ],
    },
    {
        "file": "felix/config/config_params_test.go",
        "block": "Dataplane-specific parameters",
        "reason": (
            "iptables-vs-nftables accessor selection (mark-bitmask, seconds kinds); not parsing"
        ),
        "entries": [
            (1062, "returns the nftables values when nftables was resolved"),
            (1071, "returns the iptables values when iptables was resolved"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "Endpoint list parameter parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (35, "Empty"),
            (36, "Single URL"),
            (37, "No slash"),
            (38, "Two URLs"),
            (40, "Two URLs extra commas"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "CIDR list parameter parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (57, "Empty"),
            (58, "Single IPv4"),
            (59, "Single CIDR"),
            (60, "Single CIDR subnet"),
            (61, "Mix of IP and CIDRs"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "KeyValue list parameter parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (77, "Empty"),
            (78, "Single value"),
            (81, "Malformed"),
            (82, "Spaces"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "IPv4 list parameter parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (103, "Empty"),
            (104, "IPv4 address"),
            (105, "IPv6 address"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "IPv6 list parameter parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (123, "Empty"),
            (124, "IPv4 address"),
            (125, "IPv6 address"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "String Slice parameter with InterfaceRegex parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (143, "StringSliceParam Empty"),
            (144, "StringSliceParam Single valid entry"),
            (145, "StringSliceParam Single valid entry"),
            (146, "StringSliceParam Multiple valid entries"),
            (147, "StringSliceParam Single invalid entry"),
            (148, "StringSliceParam Single invalid wildcard"),
            (149, "StringSliceParam Multiple invalid entries"),
        ],
    },
    {
        "file": "felix/config/param_types_test.go",
        "block": "String Slice parameter with IfaceParamRegexp parsing",
        "reason": ("parameter type the PrometheusMetrics* params do not use; not ported"),
        "entries": [
            (167, "StringSliceParam Empty"),
            (168, "StringSliceParam Single valid entry"),
            (169, "StringSliceParam Single valid entry"),
            (170, "StringSliceParam Single valid wildcard"),
            (171, "StringSliceParam Multiple valid entries"),
            (172, "StringSliceParam Single invalid entry"),
            (173, "StringSliceParam Multiple invalid entries"),
        ],
    },
    {
        "file": "felix/config/file_loader_test.go",
        "block": "File load tests",
        "reason": (
            "LoadConfigFile's absent-file path (os.Stat); the port takes the file's text, no I/O"
        ),
        "entries": [
            (78, "Missing"),
        ],
    },
    {
        "file": "felix/config/env_var_loader_test.go",
        "block": "Environment parameter parsing",
        "reason": (
            "LoadConfigFromEnvironment (FELIX_ prefix stripped, names lower-cased) is not "
            "part of this port"
        ),
        "entries": [
            (29, "Empty"),
            (30, "Malformed"),
            (31, "Mainline"),
        ],
    },
    {
        "file": "parser_test.go",
        "block": "TestBOM",
        "reason": (
            "empty subtest upstream: asserts nothing (a UTF-16 BE file does not load: its "
            "first line has no delimiter)"
        ),
        "entries": [
            (40, "test handling BOM/UTF-16-BE-BOM"),
        ],
    },
    {
        "file": "ini_test.go",
        "block": "TestLoad",
        "reason": (
            "several data sources in one Load (files, readers); asserts String(), which "
            "expands %(NAME)s, where Felix uses raw key.Value()"
        ),
        "entries": [
            (56, "load from good data sources"),
        ],
    },
    {
        "file": "ini_test.go",
        "block": "TestLoad",
        "reason": ("loads a file path / an unsupported Go type; the port takes text"),
        "entries": [
            (79, "load from bad data sources/invalid input"),
            (84, "load from bad data sources/unsupported type"),
        ],
    },
    {
        "file": "ini_test.go",
        "block": "TestLooseLoad",
        "reason": ("loads a missing file path; the port takes text"),
        "entries": [
            (234, "inverse case"),
        ],
    },
    {
        "file": "ini_test.go",
        "block": "TestLoadSources",
        "reason": ("loads a missing file path; the port takes text"),
        "entries": [
            (
                912,
                ("with false `AllowPythonMultilineValues`/ignore nonexistent files/inverse case"),
            ),
        ],
    },
    {
        "file": "ini_test.go",
        "block": "TestLoadSources",
        "reason": ("several data sources in one Load; Felix loads a single []byte"),
        "entries": [
            (1439, "ShortCircuit/ensure all sources are loaded without ShortCircuit"),
        ],
    },
    {
        "file": "file_test.go",
        "block": "TestFile_GetSection / TestFile_HasSection / TestFile_Section",
        "reason": (
            "section lookup API on full.ini; no key/value assertions (full.ini's keys are "
            "carried in the TestFile_WriteTo case)"
        ),
        "entries": [
            (223, "TestFile_GetSection"),
            (239, "TestFile_HasSection"),
            (254, "TestFile_Section/get a section"),
        ],
    },
    {
        "file": "file_test.go",
        "block": "TestFile_Append",
        "reason": ("appends a second data source; Felix loads a single []byte"),
        "entries": [
            (392, "TestFile_Append"),
        ],
    },
    {
        "file": "file_test.go",
        "block": "TestFile_SaveTo",
        "reason": ("writes files; the port only reads"),
        "entries": [
            (480, "TestFile_SaveTo"),
        ],
    },
    {
        "file": "key_test.go",
        "block": "TestKey_Helpers",
        "reason": (
            "per-section lookups asserting String() (with %(var)s expansion) and typed "
            "getters; full.ini's raw values are carried in the TestFile_WriteTo case"
        ),
        "entries": [
            (164, "getting and setting values"),
        ],
    },
    {
        "file": "key_test.go",
        "block": "TestRecursiveValues",
        "reason": (
            "asserts String(), which expands %(NAME)s; Felix uses raw key.Value(), so the "
            "asserted values do not apply"
        ),
        "entries": [
            (615, "recursive values should not reflect on same key"),
        ],
    },
    {
        "file": "section_test.go",
        "block": "TestSection_KeyHash",
        "reason": ("two data sources in one Load; Felix loads a single []byte"),
        "entries": [
            (275, "get clone of key hash"),
        ],
    },
    {
        "file": "struct_test.go",
        "block": "MapTo",
        "reason": ("MapTo/StrictMapTo reflection into Go structs; Felix does not map"),
        "entries": [
            (278, "map section to struct"),
            (287, "map to non-pointer struct"),
            (295, "map to unsupported type"),
            (332, "map to wrong types and gain default values"),
            (348, "map to extended base"),
            (359, "map to struct in strict mode"),
            (374, "map slice in strict mode"),
            (834, "test name mappers"),
        ],
    },
]
