# @summary A Vac factory: the vac package, its configuration fragments in /etc/vac.d, vacd and
#   the APEL timers.
#
# Configuration goes into fragments named after the convention in etc/puppet/README
# (/usr/share/vac/puppet/README): 10-puppet-settings.conf for [settings] and
# 50-puppet-machinetype-NAME.conf per machinetype. vacd re-reads its configuration every cycle;
# a changed fragment also triggers "systemctl reload vacd" so it applies at once. Running VMs
# are never restarted by Puppet.
#
# @example
#   class { 'vac':
#     space        => 'vac01.example.org',
#     factories    => ['factory1.example.org', 'factory2.example.org'],
#     settings     => { 'gocdb_sitename' => 'UKI-EXAMPLE', 'hs06_per_processor' => 10.5 },
#     machinetypes => {
#       'lhcbprod' => {
#         'target_share'          => 1,
#         'root_image'            => 'https://cernvm.cern.ch/releases/production/cernvm4-micro-latest.iso',
#         'user_data'             => 'https://lhcb-portal-dirac.cern.ch/pilot/user_data',
#         'accounting_fqan'       => '/lhcb/Role=NULL/Capability=NULL',
#         'max_wallclock_seconds' => 172800,
#       },
#     },
#     apel_cert_source => 'puppet:///modules/site/vac-apel-cert.pem',
#     apel_key_source  => 'puppet:///modules/site/vac-apel-key.pem',
#   }
#
# @param space
#   The space name (vac_space): the same on every factory of the space.
# @param factories
#   All factories of the space, as "name" or "name@address" (factories).
# @param settings
#   Further [settings] options, e.g. total_processors, gocdb_sitename, metrics_port.
# @param machinetypes
#   Machinetype name (a-z, 0-9, -) => its options.
# @param machinetypes_files_source
#   Optional Puppet source of a directory copied to /var/lib/vac/machinetypes (per-machinetype
#   certificates, user_data templates, images), as the classic module did.
# @param purge_fragments
#   Remove fragments in /etc/vac.d that Puppet does not manage (local overrides then belong in
#   /etc/vac.conf).
# @param apel_cert_source
#   Puppet source of the certificate ssmsend uses for APEL; undef leaves it unmanaged.
# @param apel_key_source
#   Puppet source of its private key (installed mode 0600).
# @param apel_cert_path
#   Where the certificate goes; must match /etc/apel/vac-ssmsend-prod.cfg.
# @param apel_key_path
#   Where the key goes; must match /etc/apel/vac-ssmsend-prod.cfg.
# @param apel_timers
#   Enable vac-apel-sync.timer (daily sync records) and vac-ssmsend.timer (hourly sending).
class vac (
  Pattern[/\A[a-z0-9][a-z0-9.-]*\z/] $space,
  Array[Pattern[/\A[a-z0-9.-]+(@[0-9a-zA-Z.:\[\]-]+)?\z/]] $factories = [],
  Hash[Pattern[/\A[a-z0-9_]+\z/], Variant[Pattern[/\A[^\n\r]*\z/], Numeric, Boolean]] $settings = {},
  Hash[Pattern[/\A[a-z0-9-]+\z/], Hash[Pattern[/\A[a-z0-9_]+\z/], Variant[Pattern[/\A[^\n\r]*\z/], Numeric, Boolean]]] $machinetypes = {},
  Optional[String[1]] $machinetypes_files_source = undef,
  Boolean $purge_fragments = true,
  Optional[String[1]] $apel_cert_source = undef,
  Optional[String[1]] $apel_key_source = undef,
  String[1] $apel_cert_path = '/etc/grid-security/vac-apel-cert.pem',
  String[1] $apel_key_path = '/etc/grid-security/vac-apel-key.pem',
  Boolean $apel_timers = true,
) {
  package { 'vac':
    ensure => installed,
  }

  file { '/etc/vac.d':
    ensure  => directory,
    owner   => 'root',
    group   => 'root',
    mode    => '0755',
    recurse => $purge_fragments,
    purge   => $purge_fragments,
    require => Package['vac'],
  }

  file { '/etc/vac.d/10-puppet-settings.conf':
    ensure  => file,
    owner   => 'root',
    group   => 'root',
    mode    => '0644',
    content => epp('vac/settings.conf.epp', {
      'space'     => $space,
      'factories' => $factories,
      'settings'  => $settings,
    }),
    notify  => Service['vacd'],
  }

  $machinetypes.each |String $name, Hash $options| {
    file { "/etc/vac.d/50-puppet-machinetype-${name}.conf":
      ensure  => file,
      owner   => 'root',
      group   => 'root',
      mode    => '0644',
      content => epp('vac/machinetype.conf.epp', { 'name' => $name, 'options' => $options }),
      notify  => Service['vacd'],
    }
  }

  if $machinetypes_files_source {
    file { '/var/lib/vac/machinetypes':
      ensure  => directory,
      source  => $machinetypes_files_source,
      recurse => true,
      purge   => true,
      force   => true,
      require => Package['vac'],
    }
  }

  # A refresh reloads: vacd keeps its VMs and applies the new configuration at once.
  service { 'vacd':
    ensure  => running,
    enable  => true,
    restart => '/usr/bin/systemctl reload vacd',
    require => Package['vac'],
  }

  # The directory of the certificate and key (/etc/grid-security by default) is there only on
  # hosts already set up for grid services.
  $apel_files = {
    $apel_cert_path => $apel_cert_source,
    $apel_key_path  => $apel_key_source,
  }.filter |$path, $source| { $source =~ NotUndef }.keys
  $apel_files.map |$path| { $path.regsubst('/[^/]+$', '') }.unique.each |$directory| {
    unless defined(File[$directory]) {
      file { $directory:
        ensure => directory,
        owner  => 'root',
        group  => 'root',
        mode   => '0755',
      }
    }
  }

  if $apel_cert_source {
    file { $apel_cert_path:
      ensure => file,
      owner  => 'root',
      group  => 'root',
      mode   => '0644',
      source => $apel_cert_source,
    }
  }

  if $apel_key_source {
    file { $apel_key_path:
      ensure    => file,
      owner     => 'root',
      group     => 'root',
      mode      => '0600',
      source    => $apel_key_source,
      show_diff => false,
    }
  }

  $timer_state = $apel_timers ? {
    true  => 'running',
    false => 'stopped',
  }
  service { ['vac-apel-sync.timer', 'vac-ssmsend.timer']:
    ensure  => $timer_state,
    enable  => $apel_timers,
    require => Package['vac'],
  }
}
